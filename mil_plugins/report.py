"""Run report: ``metrics.json``, ``report.md`` and two plots, and a table comparing runs.

``write_report(out_dir, result)`` takes what a run produced::

    {
      "method": "finetune",
      "recipe": "recipes/img_audio.yaml",
      "stages": ["coco", "clotho"],                 # stage names, in training order
      "modalities": ["image", "audio"],             # one per stage
      "accuracy_matrix": [[80.0, None], [70.0, 60.0]],   # R[i][j]: stage j after training stage i
      "baseline": [10.0, 5.0],                      # optional: untrained model's score per stage
      "trainable_parameters": [4_200_000, 4_200_000],
      "seconds": [812.4, 640.0],
      "per_task": {"coco": {"caption": 70.0}},      # optional: per-task scores after the last stage
    }

and writes, each atomically (:mod:`mil_plugins.atomic`):

* ``metrics.json`` -- the result dict with :func:`mil_plugins.metrics.compute_all` at top level
  (``final_average_accuracy``, ``average_incremental_accuracy``, ``forgetting``,
  ``backward_transfer``, ``forward_transfer``, ``MFT``, ``MFN``, ``MAA``,
  ``per_stage_forgetting``); NaN is written as ``null``;
* ``report.md`` -- the accuracy matrix, the metrics with one-line meanings, per-stage cost;
* ``accuracy_matrix.png`` -- heatmap of R, values written in the cells, unevaluated cells grey;
* ``accuracy_curves.png`` -- each stage's score over the stages trained after it, plus the
  average over the stages seen so far.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from mil_plugins.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from mil_plugins.metrics import compute_all, stage_average_accuracy

__all__ = ["write_report", "render_markdown", "compare_runs", "REPORT_FILES"]

#: key in write_report's return value -> file name
REPORT_FILES = {
    "metrics": "metrics.json",
    "report": "report.md",
    "accuracy_matrix": "accuracy_matrix.png",
    "accuracy_curves": "accuracy_curves.png",
}

_METRIC_ROWS = (
    ("final_average_accuracy", "Final average accuracy",
     "mean score over all stages after training the last one (= MFN)"),
    ("average_incremental_accuracy", "Average incremental accuracy",
     "mean over t of the average score on the stages seen after stage t (= MAA)"),
    ("forgetting", "Forgetting",
     "mean drop from each earlier stage's best score to its final score (higher = more forgotten)"),
    ("backward_transfer", "Backward transfer (BWT)",
     "mean final score minus score right after training, earlier stages (negative = forgotten)"),
    ("forward_transfer", "Forward transfer (FWT)",
     "mean score on a stage just before training it, minus the untrained model's score"),
    ("MFT", "MFT", "mean score on each stage right after training it (MCITlib)"),
    ("MFN", "MFN", "mean score on every stage after the last stage (MCITlib)"),
    ("MAA", "MAA", "mean over stages of the average score on the stages seen so far (MCITlib)"),
)


# ----------------------------------------------------------------------------------- helpers


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _square(R: Sequence[Sequence[Any]], n: int) -> list[list[float | None]]:
    """R padded with None to ``len(R)`` rows x ``n`` columns, NaN -> None."""
    out = []
    for row in R:
        row = list(row) if row is not None else []
        out.append([_num(row[j]) if j < len(row) else None for j in range(n)])
    return out


def _values(R: list[list[float | None]], extra: Sequence[Any] = ()) -> list[float]:
    vals = [v for row in R for v in row if v is not None]
    vals += [v for v in (_num(x) for x in extra) if v is not None]
    return vals


def _unit_scale(vals: Sequence[float]) -> bool:
    """True when every score lies in [0, 1] (scores given as fractions, not percentages)."""
    return bool(vals) and all(-1.0 <= v <= 1.0 for v in vals)


def _fmt(x: Any, digits: int) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:.{digits}f}"


def _fmt_signed(x: Any, digits: int) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:+.{digits}f}"


def _fmt_int(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{int(round(v)):,}"


def _human_count(x: float | None) -> str:
    if x is None:
        return "—"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{int(x)}"


def _fmt_seconds(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "—"
    if v < 60:
        return f"{v:.1f} s"
    m, s = divmod(int(round(v)), 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s"


def _md(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> list[str]:
    sep = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep[a] for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _padded(xs: Sequence[Any] | None, n: int) -> list[Any]:
    xs = list(xs) if xs is not None else []
    return [xs[i] if i < len(xs) else None for i in range(n)]


def _validate(result: Mapping[str, Any]) -> tuple[list[str], list[str], list[list[Any]]]:
    for key in ("stages", "accuracy_matrix"):
        if key not in result:
            raise ValueError(f"result has no {key!r} (keys: {sorted(result)})")
    stages = [str(s) for s in result["stages"]]
    n = len(stages)
    modalities = list(result.get("modalities") or [None] * n)
    if len(modalities) != n:
        raise ValueError(f"{n} stages but {len(modalities)} modalities")
    R = [list(row) if row is not None else [] for row in result["accuracy_matrix"]]
    if len(R) > n:
        raise ValueError(f"accuracy_matrix has {len(R)} rows but there are only {n} stages")
    for i, row in enumerate(R):
        if len(row) > n:
            raise ValueError(f"accuracy_matrix row {i} has {len(row)} entries but there are {n} stages")
    for key in ("baseline", "trainable_parameters", "seconds"):
        v = result.get(key)
        if v is not None and len(v) > n:
            raise ValueError(f"{key} has {len(v)} entries but there are {n} stages")
    return stages, [str(m) if m is not None else "" for m in modalities], R


# ------------------------------------------------------------------------------------ report


def _payload(result: Mapping[str, Any]) -> dict[str, Any]:
    stages, modalities, R = _validate(result)
    n = len(stages)
    metrics = compute_all(R, result.get("baseline"))
    payload: dict[str, Any] = {
        "method": result.get("method"),
        "recipe": os.fspath(result["recipe"]) if result.get("recipe") is not None else None,
        "stages": stages,
        "modalities": modalities,
        "accuracy_matrix": _square(R, n),
        "baseline": ([_num(b) for b in _padded(result["baseline"], n)]
                     if result.get("baseline") is not None else None),
    }
    payload.update(metrics)
    payload["trainable_parameters"] = list(result.get("trainable_parameters") or [])
    payload["seconds"] = list(result.get("seconds") or [])
    if result.get("per_task") is not None:
        payload["per_task"] = result["per_task"]
    for k, v in result.items():  # anything else the run recorded
        if k not in payload:
            payload[k] = v
    return payload


def render_markdown(payload: Mapping[str, Any]) -> str:
    """``report.md`` for a payload as written to ``metrics.json``."""
    stages, modalities = payload["stages"], payload["modalities"]
    n = len(stages)
    R = _square(payload["accuracy_matrix"], n)
    T = len(R)
    baseline = payload.get("baseline")
    digits = 4 if _unit_scale(_values(R, baseline or ())) else 2

    lines = [f"# Continual-learning report: {_md(payload.get('method') or 'unknown method')}", ""]
    facts = []
    if payload.get("recipe"):
        facts.append(f"Recipe: `{payload['recipe']}`")
    facts.append(f"{T} of {n} stages trained")
    facts.append("scores in [0, 1]" if digits == 4 else "scores in percent (each stage's own metric)")
    lines += [" · ".join(facts), ""]

    # accuracy matrix
    lines += ["## Accuracy matrix", "",
              "Row *after X*: score on each stage's test split after training stage X. "
              "— = not evaluated.", ""]
    header = [""] + [f"{_md(s)} ({_md(m)})" if m else _md(s) for s, m in zip(stages, modalities)]
    rows = []
    if baseline is not None:
        rows.append(["untrained (baseline)"] + [_fmt(b, digits) for b in _padded(baseline, n)])
    for i, row in enumerate(R):
        rows.append([f"after {_md(stages[i])}"] + [_fmt(v, digits) for v in row])
    lines += _table(header, rows, ["l"] + ["r"] * n) + [""]
    se = payload.get("accuracy_se")
    if se:
        S = _square(se, n)
        rows = [[f"after {_md(stages[i])}"] + [_fmt(v, digits) for v in row] for i, row in enumerate(S)]
        worst = max((v for v in _values(S) if not math.isnan(v)), default=None)
        counts = payload.get("test_samples") or {}
        sizes = ", ".join(f"{_md(k)} {v}" for k, v in counts.items())
        lines += ["Standard error of each cell, from the size of its test split (binomial for exact "
                  "match, bootstrap over samples for BLEU / CIDEr; a cell is the mean of its "
                  f"tasks){': largest ' + _fmt(worst, digits) if worst is not None else ''}."
                  + (f" Test samples: {sizes}." if sizes else ""), ""]
        lines += _table(header, rows, ["l"] + ["r"] * n) + [""]

    # metrics
    lines += ["## Metrics", ""]
    rows = []
    for key, name, meaning in _METRIC_ROWS:
        fmt = _fmt_signed if key in ("backward_transfer", "forward_transfer") else _fmt
        rows.append([name, fmt(payload.get(key), digits), meaning])
    lines += _table(["metric", "value", "meaning"], rows, ["l", "r", "l"])
    lines += ["", "— = undefined (one stage only, or the entries it needs were not measured; "
              "forward transfer needs the untrained baseline and scores on stages before training them).", ""]

    # per-stage cost
    lines += ["## Stages", ""]
    params = _padded(payload.get("trainable_parameters"), n)
    seconds = _padded(payload.get("seconds"), n)
    fgt = _padded(payload.get("per_stage_forgetting"), n)
    rows = []
    for i in range(n):
        rows.append([str(i + 1), _md(stages[i]), _md(modalities[i]) or "—", _fmt_int(params[i]),
                     _fmt_seconds(seconds[i]), _fmt(fgt[i], digits)])
    total_p = sum(v for v in (_num(p) for p in params) if v is not None)
    total_s = sum(v for v in (_num(s) for s in seconds) if v is not None)
    rows.append(["", "**total**", "", _fmt_int(total_p), _fmt_seconds(total_s), ""])
    lines += _table(["#", "stage", "modality", "trainable parameters", "wall time", "forgetting"],
                    rows, ["r", "l", "l", "r", "r", "r"])
    lines.append("")

    per_task = payload.get("per_task")
    if per_task:
        lines += ["## Per-task scores after the final stage", ""]
        rows = []
        for stage, tasks in per_task.items():
            if isinstance(tasks, Mapping):
                for task, v in tasks.items():
                    rows.append([_md(stage), _md(task), _fmt(v, digits)])
            else:
                rows.append([_md(stage), "", _fmt(tasks, digits)])
        lines += _table(["stage", "task", "score"], rows, ["l", "l", "r"]) + [""]

    skipped = payload.get("skipped_samples")
    if skipped:
        lines += ["## Skipped samples", "",
                  f"{len(skipped)} bad sample(s) were skipped (`data.on_error: skip`); the first:", ""]
        rows = [[_md(s.get("manifest", "")), _md(s.get("id") or ""), _md(s.get("reason", ""))]
                for s in skipped[:20]]
        lines += _table(["manifest", "sample", "reason"], rows, ["l", "l", "l"]) + [""]

    lines += ["Plots: `accuracy_matrix.png`, `accuracy_curves.png`. Numbers: `metrics.json`.", ""]
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _plot_matrix(payload: Mapping[str, Any]) -> bytes:
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = payload["stages"]
    n = len(stages)
    R = _square(payload["accuracy_matrix"], n)
    T = len(R)
    vals = _values(R)
    unit = _unit_scale(vals)
    vmax = 1.0 if unit else max([100.0] + vals)
    digits = 2 if unit else 1

    data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in R] or [[np.nan] * n],
                                         dtype=float))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")

    fig = Figure(figsize=(max(4.0, 1.1 * n + 2.5), max(2.5, 0.8 * max(T, 1) + 1.8)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    for i in range(T):
        for j in range(n):
            v = R[i][j]
            if v is None:
                continue
            dark = (v / vmax) < 0.6 if vmax else True
            ax.text(j, i, f"{v:.{digits}f}", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    ax.set_xticks(range(n))
    ax.set_xticklabels(stages, rotation=30, ha="right")
    ax.set_yticks(range(max(T, 1)))
    ax.set_yticklabels([f"after {s}" for s in stages[:T]] or [""])
    ax.set_xlabel("evaluated on")
    ax.set_title(f"Accuracy matrix: {payload.get('method') or ''}".rstrip(": "))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _png(fig)


def _plot_curves(payload: Mapping[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = payload["stages"]
    n = len(stages)
    R = _square(payload["accuracy_matrix"], n)
    T = len(R)

    fig = Figure(figsize=(max(5.0, 1.0 * T + 3.5), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for j in range(min(n, T)):
        pts = [(i, R[i][j]) for i in range(j, T) if R[i][j] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=stages[j])
    avg = [(t, stage_average_accuracy(R, t)) for t in range(T)]
    avg = [(t, a) for t, a in avg if a is not None]
    if avg:
        xs, ys = zip(*avg)
        ax.plot(xs, ys, "k--", marker="s", linewidth=2, label="average (seen stages)")
    ax.set_xticks(range(max(T, 1)))
    ax.set_xticklabels(stages[:T] or [""], rotation=30, ha="right")
    ax.set_xlim(-0.3, max(T - 1, 0) + 0.3)
    ax.set_xlabel("after stage")
    ax.set_ylabel("score")
    ax.set_title(f"Scores over training: {payload.get('method') or ''}".rstrip(": "))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _png(fig)


def write_report(out_dir: str | os.PathLike, result: Mapping[str, Any]) -> dict[str, Path]:
    """Compute the metrics of ``result`` and write the four report files into ``out_dir``.

    Returns ``{"metrics": .../metrics.json, "report": .../report.md,
    "accuracy_matrix": .../accuracy_matrix.png, "accuracy_curves": .../accuracy_curves.png}``.
    ``metrics.json`` is written first, so the numbers survive even if plotting fails.
    ``result`` is not modified. Raises ``ValueError`` if its shapes disagree with ``stages``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = _payload(result)
    paths = {k: out / name for k, name in REPORT_FILES.items()}
    atomic_write_json(paths["metrics"], payload)
    atomic_write_text(paths["report"], render_markdown(payload))
    atomic_write_bytes(paths["accuracy_matrix"], _plot_matrix(payload))
    atomic_write_bytes(paths["accuracy_curves"], _plot_curves(payload))
    return paths


# ------------------------------------------------------------------------------ compare runs


def compare_runs(metrics_paths: Sequence[str | os.PathLike]) -> str:
    """A markdown table with one row per run, for ``docs/results.md``.

    Each path is a ``metrics.json`` (or a run directory holding one). Columns: run (the
    directory name), method, final average accuracy, forgetting, BWT, trainable parameters
    summed over stages, wall time summed over stages. Metrics missing from an older file are
    recomputed from its accuracy matrix.
    """
    rows = []
    for p in metrics_paths:
        p = Path(p)
        if p.is_dir():
            p = p / REPORT_FILES["metrics"]
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
        if any(k not in m for k in ("final_average_accuracy", "forgetting", "backward_transfer")):
            m = {**compute_all(m.get("accuracy_matrix") or [], m.get("baseline")), **m}
        R = _square(m.get("accuracy_matrix") or [], len(m.get("stages") or []) or
                    max((len(r) for r in m.get("accuracy_matrix") or [[]]), default=0))
        digits = 4 if _unit_scale(_values(R)) else 2
        params = [v for v in (_num(x) for x in m.get("trainable_parameters") or []) if v is not None]
        secs = [v for v in (_num(x) for x in m.get("seconds") or []) if v is not None]
        rows.append([
            _md(p.parent.name or p.parent.resolve().name),
            _md(m.get("method") or "—"),
            _fmt(m.get("final_average_accuracy"), digits),
            _fmt(m.get("forgetting"), digits),
            _fmt_signed(m.get("backward_transfer"), digits),
            _human_count(sum(params)) if params else "—",
            _fmt_seconds(sum(secs)) if secs else "—",
        ])
    header = ["run", "method", "final avg acc", "forgetting", "BWT",
              "trainable params (sum over stages)", "wall time"]
    return "\n".join(_table(header, rows, ["l", "l", "r", "r", "r", "r", "r"])) + "\n"

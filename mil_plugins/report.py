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

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from mil_plugins.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from mil_plugins.metrics import compute_all, stage_average_accuracy  # noqa: F401
from mil_plugins.report_plots import _plot_curves, _plot_matrix, _png  # noqa: F401
from mil_plugins.report_tables import (_fmt, _fmt_int, _fmt_seconds, _fmt_signed,  # noqa: F401
                                       _human_count, _md, _num, _padded, _square, _table,
                                       _unit_scale, _validate, _values)

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

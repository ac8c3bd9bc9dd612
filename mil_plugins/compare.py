"""Methods compared over seeds: run folders -> per-method statistics -> a results file -> markdown.

``tools/compare.py`` runs each recipe over N seeds (or reads run folders that exist) and writes a
results JSON (:func:`aggregate`); the markdown shown in the docs is *rendered from that file*
(:func:`render`) and sits between markers::

    <!-- results: docs/results/small.json -->
    ...rendered table...
    <!-- /results -->

so that :func:`check_doc` (and a test) can tell when a document and its results file disagree.
Numbers are never typed into the docs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mil_plugins.stats import paired, summarize

#: the metrics tabulated, in order: (key in metrics.json, column title, higher is better)
METRICS = (
    ("final_average_accuracy", "final avg acc", True),
    ("forgetting", "forgetting", False),
    ("backward_transfer", "BWT", True),
    ("average_incremental_accuracy", "avg incremental acc", True),
)

#: federated runs (``mil federate``; docs/federated.md) add these, tabulated by the ``federated`` view
FEDERATED_METRICS = (
    ("final_average_accuracy", "personalised models", True),
    ("final_global_accuracy", "global model", True),
)

BLOCK = re.compile(r"<!-- results: (?P<path>[^ ]+?)(?: (?P<view>[a-z_]+))? -->\n(?P<body>.*?)<!-- /results -->",
                   re.S)


def read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir}: no metrics.json (has the run finished?)") from None


def _chance(stage_modalities: Mapping[str, str], tasks: Mapping[str, Iterable[str]]) -> dict:
    """Each task's chance level where it is a built-in benchmark task, else ``None``."""
    from mil_plugins.benchmark.concepts import chance_level
    from mil_plugins.benchmark.mixed import chance_level as mixed_chance, is_mixed_stage

    out: dict[str, dict[str, float | None]] = {}
    for stage, names in tasks.items():
        out[stage] = {}
        level = mixed_chance if is_mixed_stage(stage) else chance_level  # captions: CIDEr there
        for task in names:
            try:
                out[stage][task] = 100.0 * level(stage_modalities[stage], task)
            except KeyError:
                out[stage][task] = None
    return out


def aggregate(groups: Mapping[str, Sequence[Path]], reference: str | None = "finetune",
              command: str = "") -> dict:
    """Statistics of every group of run folders (one group = one method / recipe over seeds).

    Paired differences are taken against the group named ``reference`` (matched by seed), when
    it is one of the groups."""
    out: dict[str, Any] = {"command": command, "reference": reference, "groups": {}}
    stage_modalities: dict[str, str] = {}
    task_names: dict[str, list[str]] = {}
    runs: dict[str, list[dict]] = {}
    for label, dirs in groups.items():
        runs[label] = []
        for d in dirs:
            m = read_run(Path(d))
            m["_dir"] = str(d)
            m["_seed"] = (m.get("seed") if m.get("seed") is not None else
                          _seed_of(Path(d)))
            runs[label].append(m)
            for s, mod in zip(m.get("stages") or [], m.get("modalities") or []):
                stage_modalities.setdefault(s, mod)
            for s, tasks in (m.get("per_task") or {}).items():
                names = task_names.setdefault(s, [])
                names.extend(t for t in tasks if t not in names)
    ref = runs.get(reference) if reference else None
    for label, ms in runs.items():
        g: dict[str, Any] = {
            "method": ms[0].get("method") if ms else None,
            "recipe": ms[0].get("recipe") if ms else None,
            "runs": [m["_dir"] for m in ms],
            "seeds": [m["_seed"] for m in ms],
            "metrics": {k: summarize([m.get(k) for m in ms])
                        for k, _, _ in METRICS + FEDERATED_METRICS},
            "per_task": {s: {t: summarize([(m.get("per_task") or {}).get(s, {}).get(t) for m in ms])
                             for t in tasks} for s, tasks in task_names.items()},
            "accuracy_matrix": _mean_matrix([m.get("accuracy_matrix") or [] for m in ms]),
            "trainable_parameters": summarize([sum(x for x in (m.get("trainable_parameters") or [])
                                                   if x is not None) for m in ms]),
            "seconds": summarize([sum(x for x in (m.get("seconds") or []) if x is not None)
                                  for m in ms]),
            "max_cell_se": max((v for m in ms for row in (m.get("accuracy_se") or []) for v in row
                                if v is not None), default=None),
        }
        if ref is not None and label != reference:
            by_seed = {m["_seed"]: m for m in ref}
            pairs = [(m, by_seed.get(m["_seed"])) for m in ms]
            g["paired"] = {k: paired([m.get(k) for m, r in pairs if r is not None],
                                     [r.get(k) for m, r in pairs if r is not None])
                           for k, _, _ in METRICS + FEDERATED_METRICS}
        out["groups"][label] = g
    if all(m.get("kind") == "federated" for ms in runs.values() for m in ms):
        out["kind"] = "federated"
    out["chance"] = _chance(stage_modalities, task_names)
    out["stages"] = list(stage_modalities)
    return out


def _seed_of(d: Path) -> int | None:
    m = re.search(r"seed-?(\d+)", d.name)
    return int(m.group(1)) if m else None


def _mean_matrix(matrices: Sequence[Sequence[Sequence[float | None]]]) -> list[list[float | None]]:
    if not matrices or not matrices[0]:
        return []
    rows, cols = len(matrices[0]), max(len(r) for r in matrices[0])
    out = []
    for i in range(rows):
        row = []
        for j in range(cols):
            vals = [M[i][j] for M in matrices if i < len(M) and j < len(M[i]) and M[i][j] is not None]
            row.append(sum(vals) / len(vals) if vals else None)
        out.append(row)
    return out


# ---- rendering -----------------------------------------------------------------------------------

def _pm(s: Mapping[str, Any] | None, digits: int = 1) -> str:
    if not s or s.get("mean") is None:
        return "—"
    if s.get("std") is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _ci(s: Mapping[str, Any] | None, digits: int = 1, signed: bool = False) -> str:
    if not s or s.get("mean") is None:
        return "—"
    sign = "+" if signed else ""
    text = f"{s['mean']:{sign}.{digits}f}"
    if s.get("ci95"):
        lo, hi = s["ci95"]
        text += f" [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"
    return text


def _bracket(s: Mapping[str, Any] | None, digits: int = 1) -> str:
    if not s or not s.get("ci95"):
        return ""
    lo, hi = s["ci95"]
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _count(x: float | None) -> str:
    if x is None:
        return "—"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def render_summary(result: Mapping[str, Any]) -> str:
    """One row per method: each metric as mean ± std over seeds, with its 95% interval."""
    groups = result["groups"]
    n = max((len(g["runs"]) for g in groups.values()), default=0)
    lines = [f"| method | seeds | " + " | ".join(f"{t} (mean ± std) [95% CI]" for _, t, _ in METRICS)
             + " | trainable params (sum over stages) |",
             "|---|---:|" + "---:|" * len(METRICS) + "---:|"]
    for label, g in groups.items():
        cells = [f"{_pm(g['metrics'][k])} {_bracket(g['metrics'][k])}".strip() for k, _, _ in METRICS]
        lines.append(f"| {label} | {len(g['runs'])} | " + " | ".join(cells)
                     + f" | {_count(g['trainable_parameters']['mean'])} |")
    text = "\n".join(lines)
    ref = result.get("reference")
    paired_groups = {k: g for k, g in groups.items() if "paired" in g}
    if ref in groups and paired_groups:
        lines = ["", f"Paired differences to `{ref}` (same seeds; mean [95% CI]; forgetting: "
                     f"negative is better):", "",
                 "| method | " + " | ".join(f"Δ {t}" for _, t, _ in METRICS) + " |",
                 "|---|" + "---:|" * len(METRICS)]
        for label, g in paired_groups.items():
            lines.append(f"| {label} | " + " | ".join(_ci(g["paired"][k], signed=True)
                                                     for k, _, _ in METRICS) + " |")
        text += "\n" + "\n".join(lines)
    se = [g["max_cell_se"] for g in groups.values() if g.get("max_cell_se") is not None]
    if se:
        text += (f"\n\nLargest standard error of one accuracy-matrix cell (from its test-split size): "
                 f"{max(se):.2f} points. Over {n} seeds.")
    return text + "\n"


def render_tasks(result: Mapping[str, Any]) -> str:
    """Per task, after the final stage: chance and each method's mean ± std over seeds."""
    groups = result["groups"]
    labels = list(groups)
    lines = ["| stage | task | chance | " + " | ".join(labels) + " |",
             "|---|---|---:|" + "---:|" * len(labels)]
    for stage, tasks in result["chance"].items():
        for task, chance in tasks.items():
            cells = [_pm(groups[l]["per_task"].get(stage, {}).get(task)) for l in labels]
            lines.append(f"| {stage} | {task} | {'—' if chance is None else f'{chance:.1f}'} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_matrix(result: Mapping[str, Any], label: str) -> str:
    """The accuracy matrix of one method, averaged over seeds."""
    g = result["groups"][label]
    stages = result["stages"]
    lines = ["| after \\ on | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for i, row in enumerate(g["accuracy_matrix"]):
        lines.append(f"| {stages[i]} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def _probe_gap(result: Mapping[str, Any]) -> str:
    from mil_plugins.probe import render_probe_gap
    return render_probe_gap(dict(result))


def render_brief(result: Mapping[str, Any]) -> str:
    """One sentence per method: final average accuracy and forgetting, mean ± std over seeds."""
    parts = []
    for label, g in result["groups"].items():
        m = g["metrics"]
        parts.append(f"`{label}` {_pm(m['final_average_accuracy'])} final average accuracy, "
                     f"{_pm(m['forgetting'])} forgetting")
    n = max((len(g["runs"]) for g in result["groups"].values()), default=0)
    return "; ".join(parts) + f" (mean ± std over {n} seeds).\n"


def render_federated(result: Mapping[str, Any]) -> str:
    """Federated runs: the mean over clients of each client's score on its own test split after
    the last round (personalised models, and the global model), mean ± std over seeds with the
    95% interval; per task; paired differences to the reference."""
    groups = result["groups"]
    n = max((len(g["runs"]) for g in groups.values()), default=0)
    titles = [t for _, t, _ in FEDERATED_METRICS]
    lines = ["| aggregation | seeds | " + " | ".join(f"{t} (mean ± std) [95% CI]" for t in titles)
             + " |", "|---|---:|" + "---:|" * len(titles)]
    for label, g in groups.items():
        cells = [f"{_pm(g['metrics'][k])} {_bracket(g['metrics'][k])}".strip()
                 for k, _, _ in FEDERATED_METRICS]
        lines.append(f"| {label} | {len(g['runs'])} | " + " | ".join(cells) + " |")
    tasks = list(dict.fromkeys(t for g in groups.values() for s in g["per_task"].values() for t in s))
    lines += ["", "Per task, personalised models (mean ± std):", "",
              "| aggregation | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for label, g in groups.items():
        per = next(iter(g["per_task"].values()), {})
        lines.append(f"| {label} | " + " | ".join(_pm(per.get(t)) for t in tasks) + " |")
    ref = result.get("reference")
    paired_groups = {k: g for k, g in groups.items() if "paired" in g}
    if ref in groups and paired_groups:
        lines += ["", f"Paired differences to `{ref}` (same seeds; mean [95% CI]):", "",
                  "| aggregation | " + " | ".join(f"Δ {t}" for t in titles) + " |",
                  "|---|" + "---:|" * len(titles)]
        for label, g in paired_groups.items():
            lines.append(f"| {label} | " + " | ".join(_ci(g["paired"][k], signed=True)
                                                      for k, _, _ in FEDERATED_METRICS) + " |")
    return "\n".join(lines) + f"\n\nOver {n} seeds.\n"


def render_tme_routing(result: Mapping[str, Any]) -> str:
    """The table of a ``bench/tme_routing.py`` results file: per stage, TME's decision for it and
    the share of its test inputs routed (from the input alone) to the branch it trained."""
    lines = ["| stage | decision (source, similarity) | its branch | test inputs | routed to own "
             "branch | choices |", "|---|---|---|---:|---:|---|"]
    decisions = result.get("decisions") or {}
    for name, row in result["stages"].items():
        d = decisions.get(row.get("key"))
        how = "—" if not d else (d["action"] if d.get("source") is None else
                                 f"{d['action']} ({d['source']}, {d['similarity']:.2f})")
        share = "—" if row["own_share"] is None else f"{100 * row['own_share']:.1f}%"
        choices = ", ".join(f"{k}: {v}" for k, v in sorted(row["choices"].items()))
        lines.append(f"| {name} | {how} | {row['branch']} | {row['n']} | {share} | {choices} |")
    if result.get("command"):
        lines += ["", f"Produced by: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def _minutes(seconds: float) -> str:
    whole = int(round(seconds))
    return f"{whole // 60} min {whole % 60} s" if whole >= 60 else f"{whole} s"


def render_fresh_run(result: Mapping[str, Any]) -> str:
    """``bench/fresh_run.py``'s measurement as one paragraph: the wall time of a run from nothing,
    how it splits, and the machine it was measured on."""
    m = result["machine"]
    pre = result.get("encoder_pretraining_seconds") or {}
    parts = []
    if pre:
        parts.append(f"encoder pretraining {sum(pre.values()):.0f} s of work over "
                     f"{result.get('encoder_pretraining_workers', 1)} worker(s) "
                     f"({', '.join(f'{k} {v:.0f}' for k, v in pre.items())})")
    parts.append(f"the stages {sum(result['stage_seconds']):.0f} s")
    text = (f"A fresh run of `{result['recipe']}` (data generation, encoder pretraining and every "
            f"stage, nothing cached) took {_minutes(result['wall_seconds'])} on "
            f"{m['cores']} CPU cores (load average {m['load_average_before']} before it started): "
            + "; ".join(parts) + f"; final average accuracy {result['final_average_accuracy']:.1f}.\n")
    if result.get("command"):
        text += f"Produced by: `{result['command']}`\n"
    return text


VIEWS = {"federated": render_federated, "summary": render_summary, "brief": render_brief,
         "tasks": render_tasks, "probe_gap": _probe_gap, "tme_routing": render_tme_routing,
         "fresh_run": render_fresh_run}


def render_view(result: Mapping[str, Any], view: str | None) -> str:
    view = view or "summary"
    if view.startswith("matrix_"):
        return render_matrix(result, view[len("matrix_"):])
    if view not in VIEWS:
        raise ValueError(f"unknown results view {view!r}; views: {sorted(VIEWS)} or matrix_<method>")
    return VIEWS[view](result)


def render(result: Mapping[str, Any]) -> str:
    if result.get("kind") == "federated":
        text = render_federated(result)
        return text + (f"\nProduced by: `{result['command']}`\n" if result.get("command") else "")
    text = render_summary(result) + "\nPer task after the final stage (mean ± std over seeds):\n\n" \
        + render_tasks(result)
    if result.get("command"):
        text += f"\nProduced by: `{result['command']}`\n"
    return text


# ---- documents -----------------------------------------------------------------------------------

def update_doc(doc: Path, root: Path) -> int:
    """Re-render every results block of ``doc`` from its results file; returns how many."""
    text = doc.read_text(encoding="utf-8")
    count = 0

    def sub(m: re.Match) -> str:
        nonlocal count
        count += 1
        result = json.loads((root / m.group("path")).read_text(encoding="utf-8"))
        head = f"<!-- results: {m.group('path')}{' ' + m.group('view') if m.group('view') else ''} -->\n"
        return head + render_view(result, m.group("view")) + "<!-- /results -->"

    new = BLOCK.sub(sub, text)
    if new != text:
        from mil_plugins.atomic import atomic_write_text
        atomic_write_text(doc, new)
    return count


def check_doc(doc: Path, root: Path) -> list[str]:
    """Blocks of ``doc`` whose text differs from a fresh rendering of their results file."""
    problems = []
    for m in BLOCK.finditer(doc.read_text(encoding="utf-8")):
        path = root / m.group("path")
        if not path.exists():
            problems.append(f"{doc}: results file {m.group('path')} does not exist")
            continue
        want = render_view(json.loads(path.read_text(encoding="utf-8")), m.group("view"))
        if m.group("body") != want:
            problems.append(f"{doc}: the block from {m.group('path')} ({m.group('view') or 'summary'}) "
                            f"differs from its results file; re-run tools/compare.py --update-docs")
    return problems

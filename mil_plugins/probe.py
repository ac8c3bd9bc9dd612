"""Linear probes: how much of a task's answer a fixed feature vector carries.

A probe is a multinomial logistic regression from one vector per sample to the sample's answer,
each distinct answer string of the training split being one class (QA options; for captioning
tasks, each distinct caption). Predicted answers are scored with the task's own metric
(:func:`mil_plugins.scoring.score`), so a probe's score sits on the same 0-100 scale as the MLLM's
score of the same task and the two can be divided. Used by ``bench/probe_gap.py`` (the ceiling of
what a connector can pass on from a frozen encoder) and by the encoder tests (features beat the
raw input).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

#: inverse regularisation strengths tried (3-fold cross-validation on the training split)
C_GRID = (0.01, 0.1, 1.0, 10.0)


def answer_of(sample) -> str:
    """The reference answer of a one-question sample: its last assistant turn."""
    for turn in reversed(sample.conversations):
        if turn["from"] == "gpt":
            return turn["value"]
    raise ValueError(f"sample {sample.id!r} has no assistant turn to probe")


def pooled_raw(x: torch.Tensor, max_dims: int = 768) -> torch.Tensor:
    """A raw input tensor downsampled to at most ``max_dims`` values (area averaging of the
    flattened tensor): the 'no encoder' reference a probe on encoder features must beat."""
    flat = x.detach().float().reshape(1, 1, -1)
    if flat.shape[-1] > max_dims:
        flat = torch.nn.functional.adaptive_avg_pool1d(flat, max_dims)
    return flat.reshape(-1)


def fit_predict(train_x: np.ndarray, train_y: Sequence[str], test_x: np.ndarray,
                seed: int = 0) -> list[str]:
    """Standardise, fit a logistic regression (C chosen by 3-fold CV), predict test labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = sorted(set(train_y))
    if len(labels) == 1:
        return [labels[0]] * len(test_x)
    y = np.array([labels.index(a) for a in train_y])
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    counts = np.bincount(y)
    folds = int(min(3, counts.min()))
    if folds >= 2:
        model = GridSearchCV(pipe, {"logisticregression__C": list(C_GRID)},
                             cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    else:
        model = pipe
    model.fit(np.asarray(train_x, dtype=np.float64), y)
    return [labels[i] for i in model.predict(np.asarray(test_x, dtype=np.float64))]


def probe_tasks(train: Iterable[tuple[object, torch.Tensor]],
                test: Iterable[tuple[object, torch.Tensor]], seed: int = 0) -> dict[str, float]:
    """``{task: score}`` of one linear probe per task.

    ``train`` / ``test``: ``(sample, vector)`` pairs; samples are grouped by ``sample.task`` and
    scored with ``sample.metric`` (exact match when unset)."""
    from mil_plugins.scoring import score

    def group(pairs):
        out: dict[str, list] = defaultdict(list)
        for sample, vec in pairs:
            out[sample.task or "default"].append((sample, vec))
        return out

    tr, te = group(train), group(test)
    scores = {}
    for task in sorted(te):
        if task not in tr:
            continue
        x_tr = np.stack([v.numpy() for _, v in tr[task]])
        x_te = np.stack([v.numpy() for _, v in te[task]])
        preds = fit_predict(x_tr, [answer_of(s) for s, _ in tr[task]], x_te, seed)
        metrics = {s.metric or "exact_match" for s, _ in te[task]}
        if len(metrics) != 1:
            raise ValueError(f"task {task!r} mixes metrics {sorted(metrics)}")
        scores[task] = float(score(metrics.pop(), preds, [answer_of(s) for s, _ in te[task]]))
    return scores


def vectors(samples: Sequence, featurize: Callable[[object], torch.Tensor]) -> list[tuple[object, torch.Tensor]]:
    """``(sample, featurize(sample).flatten())`` for every sample."""
    return [(s, featurize(s).detach().float().reshape(-1).cpu()) for s in samples]


def render_probe_gap(result: dict) -> str:
    """The markdown table of a ``bench/probe_gap.py`` results file (``MLLM alone`` as mean ± std
    over seeds, and how many seeds reach 0.9 of the probe, when it was trained with several)."""
    several = bool(result.get("seeds"))
    head = "| stage | task | chance | raw probe | encoder probe | MLLM alone | MLLM / probe |"
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if several:
        head, rule = head + " seeds >= 0.9 |", rule + "---:|"
    lines = [head, rule]
    for stage, tasks in result["stages"].items():
        for task, v in tasks.items():
            mllm, enc = v.get("mllm"), v["encoder"]
            ratio = f"{mllm / enc:.2f}" if mllm is not None and enc else "—"
            raw = "—" if v.get("raw") is None else f"{v['raw']:.1f}"
            shown = "—" if mllm is None else f"{mllm:.1f}"
            if several and v.get("mllm_std") is not None:
                shown += f" ± {v['mllm_std']:.1f}"
            row = f"| {stage} | {task} | {v['chance']:.1f} | {raw} | {enc:.1f} | {shown} | {ratio} |"
            if several:
                values = [x for x in v.get("mllm_seeds") or [] if x is not None]
                reach = sum(1 for x in values if enc and x / enc >= 0.9)
                row += f" {reach}/{len(values)} |"
            lines.append(row)
    if result.get("command"):
        lines += ["", f"Produced by: `{result['command']}`"]
    return "\n".join(lines) + "\n"

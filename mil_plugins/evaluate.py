"""Score a model on test samples: generate answers, then each task with its own metric.

A stage's score is the mean over its tasks of the task score (exact match for QA, BLEU-4 for
captions, as each sample's ``metric`` says; 0-100). Samples are split across ranks and the
predictions gathered, so evaluation works the same in one process and under DeepSpeed.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from mil_plugins.scoring import score

DEFAULT_METRIC = "exact_match"


@torch.no_grad()
def predict(model, samples: list, make_loader: Callable[..., Any], *, methods=(), ctx=None,
            dist=None, batch_size: int = 32, max_new_tokens: int = 16, desc: str = "eval") -> list[dict]:
    """Generated answers for ``samples`` (every rank gets every prediction)."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    mine = samples[rank::world]
    real = len(mine)
    gen_kwargs = {}
    if world > 1:
        # every rank runs the same number of batches and decoding steps, so that sharded
        # parameters (ZeRO-3) can be gathered in lock-step; the padding rows are dropped
        per_rank = -(-len(samples) // world)
        mine = mine + [samples[-1]] * (per_rank - real) if samples else mine
        gen_kwargs["synced_gpus"] = True
    rows = []
    was_training = model.training
    model.eval()
    from mil_plugins.methods.dispatch import MethodHooks

    hooks = MethodHooks.of(methods, ctx)
    batches = make_loader(mine, mode="eval", batch_size=batch_size)
    seen = 0
    for batch in tqdm(batches, desc=desc, disable=rank != 0, leave=False, mininterval=1.0):
        hooks.before_forward(batch)
        answers = model.generate(batch, max_new_tokens=max_new_tokens, **gen_kwargs)
        for i, pred in enumerate(answers):
            if seen < real:
                rows.append({"id": batch["ids"][i], "prediction": pred,
                             "answer": batch["answers"][i], "task": batch["tasks"][i] or "default",
                             "metric": batch["metrics"][i] or DEFAULT_METRIC})
            seen += 1
    model.train(was_training)
    if dist is not None and world > 1:
        rows = [r for part in dist.gather(rows) for r in part]
    return rows


def score_predictions(rows: list[dict]) -> dict:
    """{"score": mean over tasks, "tasks": {task: score}, "n": count, "se": standard error of
    "score", "task_se": {task: standard error}} (see :func:`mil_plugins.stats.task_standard_error`)."""
    from mil_plugins.stats import mean_standard_error, task_standard_error

    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    tasks, task_se = {}, {}
    for task, items in sorted(by_task.items()):
        metrics = {r["metric"] for r in items}
        if len(metrics) != 1:
            raise ValueError(f"task {task!r} mixes metrics {sorted(metrics)}")
        metric = metrics.pop()
        preds, refs = [r["prediction"] for r in items], [r["answer"] for r in items]
        tasks[task] = score(metric, preds, refs)
        task_se[task] = task_standard_error(metric, preds, refs, score)
    overall = sum(tasks.values()) / len(tasks) if tasks else None
    se = mean_standard_error(list(task_se.values())) if tasks else None
    return {"score": overall, "tasks": tasks, "n": len(rows), "se": se, "task_se": task_se}


def eval_checkpoint_cli(checkpoint: Path, manifests: list[Path], root: Path | None = None,
                        batch_size: int = 16, out: str | None = None) -> int:
    """``mil eval CHECKPOINT MANIFEST...``: rebuild the model of a stage checkpoint and score it."""
    from mil_plugins.engine.session import load_for_eval

    session = load_for_eval(checkpoint)
    results = {}
    for manifest in manifests:
        samples = session.load_samples(manifest.resolve(), root)
        rows = predict(session.model, samples, session.make_loader, methods=session.methods,
                       ctx=session.ctx, batch_size=batch_size,
                       max_new_tokens=session.recipe["eval"]["max_new_tokens"], desc=manifest.name)
        results[str(manifest)] = score_predictions(rows)
        result = results[str(manifest)]
        tasks = ", ".join(f"{t} {s:.1f}" for t, s in result["tasks"].items())
        print(f"{manifest}: {result['score']:.2f} over {result['n']} samples ({tasks})")
    if out:
        from mil_plugins.atomic import atomic_write_json
        atomic_write_json(out, results)
    else:
        json.dump(results, sys.stdout, indent=2)
        print()
    return 0

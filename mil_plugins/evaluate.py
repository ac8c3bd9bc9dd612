"""Score a model on test samples: generate answers, then each task with its own metric.

A stage's score is the mean over its tasks of the task score (exact match for QA, BLEU-4 for
captions, as each sample's ``metric`` says; 0-100). Samples are split across ranks and the
predictions gathered, so evaluation works the same in one process and under DeepSpeed.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from mil_plugins.scoring import DEFAULT_METRIC, score

__all__ = ["DEFAULT_METRIC", "answer_batch", "predict", "score_predictions", "select_rows"]


@torch.no_grad()
def predict(model, samples: list, make_loader: Callable[..., Any], *, methods=(), ctx=None,
            dist=None, batch_size: int = 32, max_new_tokens: int = 16, desc: str = "eval",
            options: list | None = None) -> list[dict]:
    """Answers for ``samples`` (every rank gets every prediction): generated, or, for a sample
    whose ``options[i]`` lists ``(text, token ids)`` candidates, the likeliest candidate
    (:mod:`mil_plugins.choices`)."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    if options is not None and len(options) != len(samples):
        raise ValueError(f"{len(options)} option lists for {len(samples)} samples")
    mine = samples[rank::world]
    mine_options = options[rank::world] if options is not None else [None] * len(mine)
    real = len(mine)
    gen_kwargs = {}
    if world > 1:
        # every rank runs the same number of batches and decoding steps, so that sharded
        # parameters (ZeRO-3) can be gathered in lock-step; the padding rows are dropped
        per_rank = -(-len(samples) // world)
        mine = mine + [samples[-1]] * (per_rank - real) if samples else mine
        last = options[-1] if options is not None and samples else None
        mine_options = mine_options + [last] * (len(mine) - real)
        gen_kwargs["synced_gpus"] = True
    # under several ranks, every batch makes the calls that any batch of the split needs
    lock_step = None
    if world > 1 and options is not None:
        lock_step = (any(o is None for o in options), any(o is not None for o in options))
    rows = []
    was_training = model.training
    model.eval()
    from mil_plugins.methods.dispatch import MethodHooks

    hooks = MethodHooks.of(methods, ctx)
    batches = make_loader(mine, mode="eval", batch_size=batch_size)
    seen = 0
    for batch in tqdm(batches, desc=desc, disable=rank != 0, leave=False, mininterval=1.0):
        hooks.before_forward(batch)
        opts = mine_options[seen:seen + len(batch["ids"])]
        answers = answer_batch(model, batch, opts, max_new_tokens, gen_kwargs, lock_step)
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


def answer_batch(model, batch: dict, options: list, max_new_tokens: int, gen_kwargs: dict,
                 lock_step: tuple[bool, bool] | None = None) -> list[str]:
    """One batch's answers: generated for rows without options, chosen for rows with them.

    ``lock_step`` (several ranks): ``(generate, choose)``, the calls every batch makes whether or
    not its own rows need them, so that sharded (ZeRO-3) ranks gather parameters in step; a call
    no row needs runs on the batch and its result is dropped."""
    from mil_plugins.choices import choose

    answers: list[str] = [""] * len(options)
    closed = [i for i, o in enumerate(options) if o is not None]
    generate, pick = (len(closed) < len(options), bool(closed)) if lock_step is None else lock_step
    if generate:
        answers = list(model.generate(batch, max_new_tokens=max_new_tokens, **gen_kwargs))
    if pick and not closed:  # only to keep the ranks in step
        model.option_log_likelihoods(batch, [[[0]] for _ in options])
    elif pick:
        sub = batch if len(closed) == len(options) else select_rows(batch, closed)
        scores = model.option_log_likelihoods(sub, [[ids for _, ids in options[i]] for i in closed])
        for i, row_scores in zip(closed, scores):
            answers[i] = options[i][choose(row_scores)][0]
    return answers


def select_rows(batch: dict, rows: list[int]) -> dict:
    """The batch restricted to ``rows`` (their media rows too)."""
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        if batch.get(key) is not None:
            out[key] = batch[key][torch.tensor(rows, device=batch[key].device)]
    for key in ("ids", "modalities", "answers", "tasks", "metrics"):
        if batch.get(key) is not None:
            out[key] = [batch[key][i] for i in rows]
    media, wanted = {}, set(rows)
    for m, x in (batch.get("media") or {}).items():
        owners = [i for i, mods in enumerate(batch["modalities"]) for mm in mods if mm == m]
        keep = [k for k, owner in enumerate(owners) if owner in wanted]
        if keep:
            media[m] = x[torch.tensor(keep, device=x.device)]
    out["media"] = media
    out["media_kind"] = {m: k for m, k in (batch.get("media_kind") or {}).items() if m in media}
    return out


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

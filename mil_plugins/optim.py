"""Optimiser parameter groups (LLaVA's separate ``mm_projector_lr``) and LR schedules
(``transformers.get_scheduler``)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 mm_projector_lr: float | None) -> list[dict]:
    """AdamW groups: connector parameters get ``mm_projector_lr`` when set; no decay on biases
    and norms (as LLaVA's trainer does)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_proj = mm_projector_lr is not None and name.startswith("connector.")
        no_decay = param.ndim < 2 or "norm" in name.lower()
        groups.setdefault((is_proj, no_decay), []).append(param)
    out = []
    for (is_proj, no_decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": mm_projector_lr if is_proj else lr,
                    "weight_decay": 0.0 if no_decay else weight_decay})
    return out


def warmup_steps(total_steps: int, train: dict) -> int:
    """``warmup_steps`` when set, else ``ceil(total_steps x warmup_ratio)`` (as HF's Trainer)."""
    if train.get("warmup_steps") is not None:
        return int(train["warmup_steps"])
    return int(math.ceil(total_steps * train.get("warmup_ratio", 0.0)))


#: schedulers that step on an evaluation metric (HF's Trainer steps them after evaluating)
METRIC_DRIVEN = ("reduce_lr_on_plateau", "greedy")


@functools.lru_cache(maxsize=None)
def _stepped_by_metric(cls: type) -> type:
    """``cls`` whose ``step()`` without a metric does nothing (see :func:`make_scheduler`)."""

    def step(self, metrics=None, *args, **kwargs):
        if metrics is not None:
            cls.step(self, metrics, *args, **kwargs)

    return type(cls.__name__, (cls,), {"step": step, "__module__": cls.__module__})


def make_scheduler(optimizer: torch.optim.Optimizer, train: dict, total_steps: int):
    """``transformers.get_scheduler(train["scheduler"], ...)``: any ``SchedulerType`` with
    ``num_warmup_steps`` (:func:`warmup_steps`), ``num_training_steps`` = ``total_steps`` and
    ``train["lr_scheduler_kwargs"]`` as its ``scheduler_specific_kwargs``.

    ``reduce_lr_on_plateau`` and ``greedy`` change the rate only when stepped with an evaluation
    metric, as HF's Trainer drives them; the training loop steps without one, and a stage is
    evaluated after it is trained, so within a stage their learning rate stays where it is."""
    from transformers import get_scheduler

    kind = train["scheduler"]
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps(total_steps, train),
                              num_training_steps=total_steps,
                              scheduler_specific_kwargs=dict(train.get("lr_scheduler_kwargs") or {}))
    if kind in METRIC_DRIVEN:
        scheduler.__class__ = _stepped_by_metric(type(scheduler))
    return scheduler


def check_scheduler(train: dict) -> None:
    """Build the recipe's scheduler on a throw-away optimiser: a missing or unknown
    ``lr_scheduler_kwargs`` entry is reported when the recipe is read, not at the first stage."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    make_scheduler(optimizer, train, 10)

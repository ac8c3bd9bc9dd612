"""Optimiser parameter groups (LLaVA's separate ``mm_projector_lr``) and LR schedules."""

from __future__ import annotations

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


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int,
                   warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(1.0, max(0.0, progress))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

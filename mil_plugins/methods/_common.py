"""Small helpers shared by the built-in methods (not part of the hook interface)."""

from __future__ import annotations

import zlib
from typing import Any

import torch


def salt(*parts: Any) -> int:
    """A process-independent integer for ``ctx.generator(...)``.

    ``ctx.generator`` hashes its salt with Python's ``hash``, which is randomised per process for
    strings; integers hash the same everywhere, so methods pass ``salt("replay", name)`` instead
    of strings to get the same draw after a ``--resume`` in a new process.
    """
    return zlib.crc32("\x1f".join(map(str, parts)).encode("utf-8"))


def seeded_permutation(ctx, n: int, *parts: Any) -> list[int]:
    """A permutation of ``range(n)`` from ``ctx.generator`` (stable across processes)."""
    return torch.randperm(n, generator=ctx.generator(salt(*parts))).tolist()


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L-1]`` bool: positions whose logits predict a supervised token (``labels != -100``),
    i.e. the causal-LM shift: logits at ``t`` predict the label at ``t + 1``."""
    return labels[:, 1:] != -100


def batch_routes(batch: dict) -> list[str]:
    """Per sample, its modality for routing: the single modality of its media, ``"text"`` for a
    text-only sample, or ``"a+b"`` (sorted) for a sample with several."""
    out = []
    for mods in batch.get("modalities") or []:
        distinct = sorted(set(mods))
        out.append("+".join(distinct) if distinct else "text")
    return out


def modality_parameters(ctx, stage, samples) -> set[str]:
    """The stage's trainable groups resolved for every modality present in ``samples``.

    The engine resolves per-modality groups (``connector``: that modality's input layer or
    projector; ``encoder``) for the stage's own modality only; a method that mixes other stages'
    samples into the stage (joint, replay) adds those modalities' parts with this, so their
    samples train the same kind of parameters the recipe chose.
    """
    if ctx.resolve_groups is None:
        raise RuntimeError("ctx.resolve_groups is not set (the engine sets it when it builds the "
                           "method context)")
    groups = stage.config.get("trainable") or ctx.recipe["train"]["trainable"]
    modalities = {m for s in samples for m in s.media}
    names: set[str] = set()
    for modality in sorted(modalities):
        names |= ctx.resolve_groups(groups, modality)
    return names

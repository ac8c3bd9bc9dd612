"""Text-only prompts for distillation: a pool and seeded per-step draws from it.

MoInCL's Instruction-based Knowledge Distillation (arXiv 2412.13050) compares the previous and the
current model on a few text-only instructions every step. :class:`TextPromptPool` finds the pool
and draws from it; :func:`prompt_kl` is the distillation term on one draw.

The pool, the first that exists and holds text-only samples:

1. ``text_pool``: any LLaVA-JSON file (relative paths: under ``data.root``);
2. the benchmark's text split, ``text/train.json`` under ``data.root``;
3. the recipe's warm-up data (``warmup.train``);
4. the training samples of the recipe's text-only stages.

Samples with media are left out. A draw is a function of (run seed, stage, step, micro-batch), so
a mid-stage ``--resume`` draws the same prompts; the prompt is the sample's first human turn as
the template renders it for generation (no answer), and the term covers every prompt token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mil_plugins.methods._common import salt
from mil_plugins.methods.lwf import masked_kl


class TextPromptPool:
    def __init__(self, owner: str, text_pool: str | None = None):
        self.owner = owner          # the method's name, for error messages and the draws' salt
        self.text_pool = text_pool
        self._pool: list | None = None

    def candidates(self, ctx) -> list[str]:
        """The manifests tried, in order (the explicit ``text_pool`` alone when given)."""
        if self.text_pool is not None:
            return [self.text_pool]
        recipe = ctx.recipe or {}
        root = Path((recipe.get("data") or {}).get("root") or ".")
        out = []
        if (root / "text" / "train.json").is_file():
            out.append("text/train.json")
        if (recipe.get("warmup") or {}).get("train"):
            out.append(recipe["warmup"]["train"])
        return out

    def samples(self, ctx) -> list:
        if self._pool is not None:
            return self._pool
        load = getattr(ctx, "load_samples", None)
        pool: list = []
        for manifest in self.candidates(ctx):
            if load is None:
                raise RuntimeError(f"method {self.owner!r}: the text pool needs ctx.load_samples "
                                   f"(set by the engine)")
            pool = [s for s in load(manifest) if not s.media]
            if pool or self.text_pool is not None:
                break
        if not pool and self.text_pool is None:
            pool = [s for st in ctx.stages if st.modality is None for s in st.train_samples
                    if not s.media]
        if not pool:
            where = (f"options.text_pool {self.text_pool!r} holds no text-only samples"
                     if self.text_pool is not None else
                     "no text/train.json under data.root, no warmup.train, no text stage")
            raise ValueError(f"method {self.owner!r}: no text-only prompts to distil on ({where}); "
                             f"set options.text_pool to a LLaVA-JSON text file")
        self._pool = pool
        return pool

    def draw(self, ctx, k: int, step: int, micro: int) -> dict:
        """A generation-mode batch of ``k`` prompts for (stage, ``step``, ``micro``)."""
        pool = self.samples(ctx)
        k = min(int(k), len(pool))
        g = ctx.generator(salt(self.owner, "text", step, micro))
        picked = [pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]
        return next(iter(ctx.make_loader(picked, mode="eval", batch_size=k)))


def prompt_kl(ctx, batch: dict, T: float) -> torch.Tensor:
    """``T^2 * KL(teacher_T || student_T)`` averaged over every real token of ``batch``."""
    with torch.no_grad():
        t_logits = ctx.forward(batch, model=ctx.teacher()).logits
    s_logits = ctx.forward(batch).logits
    return masked_kl(s_logits, t_logits, batch["attention_mask"], T)

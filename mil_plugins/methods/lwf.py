"""``lwf``: Learning without Forgetting -- distil the previous model where it protects old behaviour.

Li & Hoiem, 2017, "Learning without Forgetting" (TPAMI), adapted to a causal LM as token-level
knowledge distillation of the previous model's next-token distributions (``ctx.teacher()``: the
frozen model as it was at the start of the stage).

Where it distils (``distill``):

``text`` (default)
    on text-only prompts, as MoInCL's Instruction-based Knowledge Distillation (arXiv 2412.13050)
    does: every step draws ``text_samples`` prompts (seeded by run seed, stage and step) from a text
    pool and adds ``alpha * T^2 * KL(teacher_T || student_T)`` averaged over every prompt token
    (padding excluded). The pool is ``text_pool`` (any LLaVA-JSON file, relative to ``data.root``)
    or, by default, the recipe's warm-up data (``warmup.train``), else the benchmark's text split
    (``text/train.json`` under ``data.root``), else the samples of the recipe's text-only stages.
    In modality-incremental learning the new stage's inputs are of a modality the teacher never
    learned (its input layer for it is untrained), so distilling there protects nothing; the
    language behaviour every earlier modality's answers go through is what text prompts guard.
``answers``
    the old behaviour: the same batch through the teacher, KL at the new task's answer positions.
``text+answers``
    both terms.

Returned as ``{"kd_text": ...}`` / ``{"kd": ...}``; absent in the first stage (``ctx.seen`` empty:
nothing to preserve yet) and in the warm-up. State: the step counter of the prompt draws (so a
mid-stage ``--resume`` draws the same prompts).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mil_plugins.methods._common import answer_mask, salt
from mil_plugins.methods.base import Method

DISTILL = ("text", "answers", "text+answers")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               T: float) -> torch.Tensor:
    """``T^2 * mean over answer positions of KL(teacher_T || student_T)`` (causal shift applied)."""
    return masked_kl(student_logits[:, :-1], teacher_logits[:, :-1], answer_mask(labels), T)


def masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
              T: float) -> torch.Tensor:
    """``T^2 * mean over positions where mask of KL(softmax(t/T) || softmax(s/T))``; 0 if none."""
    mask = mask.to(student_logits.device).bool()
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    s = student_logits[mask].float() / T
    t = teacher_logits.to(student_logits.device)[mask].float() / T
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True,
                  reduction="batchmean")
    return kl * (T * T)


class LwF(Method):
    name = "lwf"
    uses_teacher = True
    default_options = {
        "T": 2.0,              # distillation temperature
        "alpha": 1.0,          # weight of the distillation term(s)
        "distill": "text",     # text | answers | text+answers
        "text_pool": None,     # LLaVA-JSON of text-only prompts (null: warm-up data / text split)
        "text_samples": 4,     # prompts per step
    }

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if float(o["T"]) <= 0:
            raise ValueError(f"method 'lwf': T must be > 0, got {o['T']!r}")
        if o["distill"] not in DISTILL:
            raise ValueError(f"method 'lwf': distill must be one of {DISTILL}, got {o['distill']!r}")
        if int(o["text_samples"]) < 1:
            raise ValueError("method 'lwf': text_samples must be >= 1")
        self._pool: list | None = None
        self._step = 0    # steps done in the current stage (the prompt draws' salt)
        self._micro = 0   # forwards since the last step (gradient accumulation)

    # ---- the text pool -----------------------------------------------------------------------
    def _pool_source(self, ctx) -> list:
        recipe = ctx.recipe or {}
        root = Path((recipe.get("data") or {}).get("root") or ".")
        load = getattr(ctx, "load_samples", None)
        given = self.options["text_pool"]
        if given is not None:
            if load is None:
                raise RuntimeError("method 'lwf': text_pool needs ctx.load_samples (set by the engine)")
            return [s for s in load(given) if not s.media]
        candidates = []
        if (recipe.get("warmup") or {}).get("train"):
            candidates.append(recipe["warmup"]["train"])
        if (root / "text" / "train.json").is_file():
            candidates.append("text/train.json")
        if load is not None:
            for manifest in candidates:
                samples = [s for s in load(manifest) if not s.media]
                if samples:
                    return samples
        return [s for st in ctx.stages if st.modality is None for s in st.train_samples
                if not s.media]

    def _text_pool(self, ctx) -> list:
        if self._pool is None:
            self._pool = self._pool_source(ctx)
            if not self._pool:
                raise ValueError("method 'lwf': distill 'text' found no text-only prompts (no "
                                 "warmup.train, no text/train.json under data.root, no text "
                                 "stage); set options.text_pool to a LLaVA-JSON text file or "
                                 "options.distill: answers")
        return self._pool

    def _text_batch(self, ctx) -> dict:
        pool = self._text_pool(ctx)
        k = min(int(self.options["text_samples"]), len(pool))
        g = ctx.generator(salt("lwf", "text", self._step, self._micro))
        picked = [pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]
        return next(iter(ctx.make_loader(picked, mode="eval", batch_size=k)))

    # ---- hooks -------------------------------------------------------------------------------
    def loss_terms(self, ctx, batch, outputs):
        if not ctx.seen or ctx.stage is None or ctx.stage.index < 0:
            return {}
        alpha, T = float(self.options["alpha"]), float(self.options["T"])
        if alpha == 0.0:
            return {}
        terms = {}
        mode = self.options["distill"]
        if mode in ("answers", "text+answers") and batch.get("labels") is not None:
            teacher = ctx.teacher()
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                t_logits = teacher(inputs).logits
            labels = batch["labels"].to(outputs.logits.device)
            terms["kd"] = alpha * distill_kl(outputs.logits, t_logits, labels, T)
        if mode in ("text", "text+answers"):
            terms["kd_text"] = alpha * self._text_kd(ctx, T)
            self._micro += 1
        return terms

    def _text_kd(self, ctx, T: float) -> torch.Tensor:
        text = self._text_batch(ctx)
        with torch.no_grad():
            t_logits = ctx.forward(text, model=ctx.teacher()).logits
        s_logits = ctx.forward(text).logits
        return masked_kl(s_logits, t_logits, text["attention_mask"], T)

    def after_step(self, ctx, stage, step):
        self._step, self._micro = int(step), 0

    def after_stage(self, ctx, stage):
        self._step, self._micro = 0, 0

    def state_dict(self):
        return {"step": self._step} if self._step else {}

    def load_state_dict(self, state):
        self._step, self._micro = int((state or {}).get("step", 0)), 0

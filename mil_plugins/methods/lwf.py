"""``lwf``: Learning without Forgetting -- distil the previous model on the new stage's inputs.

Li & Hoiem, 2017, "Learning without Forgetting" (TPAMI), adapted to a causal LM as token-level
knowledge distillation of the previous model's next-token distributions.

Hook: ``loss_terms``. For every training batch of stage ``i > 0``, the frozen model as it was
before the stage (``ctx.teacher()``) runs on the same batch and

    ``kd = alpha * T^2 * mean_t KL( softmax(z_teacher_t / T) || softmax(z_student_t / T) )``

over the answer-token positions ``t`` (those whose next label is not -100: the tokens the LM loss
is computed on). Returned as ``{"kd": ...}``; absent in the first stage (``ctx.seen`` is empty:
nothing to preserve yet) and in the warm-up. Nothing is saved: the teacher is rebuilt by the
engine from the weights at the start of each stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mil_plugins.methods._common import answer_mask
from mil_plugins.methods.base import Method


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               T: float) -> torch.Tensor:
    """``T^2 * mean over answer positions of KL(teacher_T || student_T)`` (causal shift applied)."""
    mask = answer_mask(labels)
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    s = student_logits[:, :-1][mask].float() / T
    t = teacher_logits[:, :-1][mask].float() / T
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True,
                  reduction="batchmean")
    return kl * (T * T)


class LwF(Method):
    name = "lwf"
    default_options = {
        "T": 2.0,       # distillation temperature
        "alpha": 1.0,   # weight of the distillation term
    }

    def __init__(self, **options):
        super().__init__(**options)
        if float(self.options["T"]) <= 0:
            raise ValueError(f"method 'lwf': T must be > 0, got {self.options['T']!r}")

    def loss_terms(self, ctx, batch, outputs):
        if not ctx.seen or ctx.stage is None or ctx.stage.index < 0:
            return {}
        labels = batch.get("labels")
        if labels is None or float(self.options["alpha"]) == 0.0:
            return {}
        teacher = ctx.teacher()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            t_logits = teacher(inputs).logits
        labels = labels.to(outputs.logits.device)
        kd = distill_kl(outputs.logits, t_logits.to(outputs.logits.device), labels,
                        float(self.options["T"]))
        return {"kd": float(self.options["alpha"]) * kd}

"""Per-sample parameter importance, shared by ``ewc`` (Fisher) and ``tir`` (Fisher or MAS).

Both pick a seeded subset of a stage's training samples, forward them through the training path
(``ctx.forward``: every method's ``before_forward`` routing and the recipe's precision) with the
model in eval mode (no dropout), take each sample's gradient of a scalar with
``torch.autograd.grad`` (``.grad`` fields are not touched, so the optimiser never sees them),
and average a function of it over the samples.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mil_plugins.methods._common import answer_mask, seeded_permutation


def sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: each sample's negative log-likelihood summed over its answer tokens (causal
    shift; labels -100 ignored), so a long answer counts as the sum of its tokens, not their
    mean."""
    shifted = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1),
                          ignore_index=-100, reduction="none")
    return nll.view(target.shape).sum(dim=1)


def sample_output_norm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: MAS's objective per sample, the squared L2 norm of the logits averaged over the
    answer positions (Aljundi et al. 2018, Memory Aware Synapses)."""
    keep = answer_mask(labels).to(logits.dtype)
    sq = (logits[:, :-1].float() ** 2).sum(-1)
    return (sq * keep).sum(1) / keep.sum(1).clamp(min=1)


#: what is accumulated from each sample's gradient
SQUARED: Callable[[torch.Tensor], torch.Tensor] = lambda g: g ** 2  # noqa: E731  (Fisher)
ABSOLUTE: Callable[[torch.Tensor], torch.Tensor] = lambda g: g.abs()  # noqa: E731  (MAS)


def seeded_subset(ctx, samples: list, n: int | None, *salt) -> list:
    """``n`` of ``samples`` (all when ``n`` is None) in a seeded order, stable across processes."""
    order = seeded_permutation(ctx, len(samples), *salt)
    return [samples[i] for i in (order if n is None else order[: int(n)])]


Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_importance(ctx, samples: list, params: dict[str, torch.nn.Parameter],
                          batch_size: int, objective: Objective = sample_nll,
                          accumulate: Callable[[torch.Tensor], torch.Tensor] = SQUARED,
                          ) -> dict[str, torch.Tensor]:
    """``{name: mean over samples of accumulate(d objective_i / d param)}`` in float32.

    ``objective(logits, labels) -> [B]`` gives one scalar per sample; samples without an answer
    token (or whose objective does not depend on the parameters) are not counted."""
    total = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    names, tensors = list(params), list(params.values())
    model = ctx.model
    was_training = model.training
    model.eval()
    counted = 0
    try:
        for batch in ctx.make_loader(samples, mode="train", batch_size=int(batch_size)):
            with torch.enable_grad():
                logits = ctx.forward(batch).logits
                labels = batch["labels"].to(logits.device)
                per = objective(logits, labels)
                rows = [i for i in range(per.shape[0]) if per[i].requires_grad
                        and bool((labels[i, 1:] != -100).any())]
                for j, i in enumerate(rows):
                    grads = torch.autograd.grad(per[i], tensors, allow_unused=True,
                                                retain_graph=j + 1 < len(rows))
                    for k, g in zip(names, grads):
                        if g is not None:
                            total[k] += accumulate(g.detach().float())
                    counted += 1
    finally:
        model.train(was_training)
    if counted:
        for t in total.values():
            t /= counted
    return total

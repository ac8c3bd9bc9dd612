"""``ewc``: Elastic Weight Consolidation (diagonal Fisher penalty), and its online variant.

Kirkpatrick et al., 2017, "Overcoming catastrophic forgetting in neural networks" (PNAS); online
EWC from Schwarz et al., 2018, "Progress & Compress".

Hooks:
  ``after_stage``   estimate the diagonal (empirical) Fisher of the parameters that were trainable
                    in the stage: the squared gradient of the LM loss, averaged over mini-batches
                    of ``fisher_batch_size`` (1 = per sample, the textbook estimate) drawn from
                    ``fisher_samples`` of the stage's own training samples (seeded; ``null`` = all);
                    anchor ``theta*`` = the parameter values after the stage.
  ``loss_terms``    ``{"penalty": lambda/2 * sum_k sum_p F_k,p (theta_p - theta*_k,p)^2}`` over the
                    parameters trainable *now* that have a Fisher; absent before any stage has
                    finished (the first stage trains unregularised).
  ``state_dict``    the Fisher and anchor tensors (the checkpoint stores them as safetensors).

``online: false``: one (F_k, theta*_k) pair per finished stage, all penalised (the original
EWC). ``online: true``: a single pair, ``F <- gamma * F + F_new`` and ``theta* <- theta`` after
each stage (memory does not grow with the stages).

Gradients for the Fisher are taken with ``torch.autograd.grad`` on the unwrapped model in eval
mode (no dropout); ``.grad`` fields are not touched, so the optimiser never sees them.
"""

from __future__ import annotations

import torch

from mil_plugins.methods._common import seeded_permutation
from mil_plugins.methods.base import Method


class EWC(Method):
    name = "ewc"
    default_options = {
        "lambda": 100.0,          # penalty weight
        "fisher_samples": 64,     # training samples of the stage used for the Fisher (null: all)
        "fisher_batch_size": 1,   # 1: per-sample squared gradients (the empirical Fisher)
        "online": False,          # online EWC (one running Fisher) instead of one per stage
        "gamma": 1.0,             # online EWC: decay of the running Fisher
    }

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if o["fisher_samples"] is not None and int(o["fisher_samples"]) < 1:
            raise ValueError("method 'ewc': fisher_samples must be >= 1 or null (all samples)")
        if int(o["fisher_batch_size"]) < 1:
            raise ValueError("method 'ewc': fisher_batch_size must be >= 1")
        if not 0.0 <= float(o["gamma"]) <= 1.0:
            raise ValueError(f"method 'ewc': gamma must be in [0, 1], got {o['gamma']!r}")
        # [{"stage": name, "fisher": {param: F}, "anchor": {param: theta*}}]
        self.penalties: list[dict] = []
        self._terms: list | None = None  # [(param, fisher, anchor)] for the current stage

    # ---- Fisher ------------------------------------------------------------------------------
    def _fisher(self, ctx, stage, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        samples = list(stage.train_samples)
        n = self.options["fisher_samples"]
        order = seeded_permutation(ctx, len(samples), "ewc", stage.name)
        picked = [samples[i] for i in (order if n is None else order[: int(n)])]
        fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        names, tensors = list(params), list(params.values())
        model = ctx.model
        was_training = model.training
        model.eval()
        batches = 0
        try:
            for batch in ctx.make_loader(picked, mode="train",
                                         batch_size=int(self.options["fisher_batch_size"])):
                with torch.enable_grad():
                    loss = model(batch).loss
                    if loss is None or not loss.requires_grad:
                        continue
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for k, g in zip(names, grads):
                    if g is not None:
                        fisher[k] += g.detach().float() ** 2
                batches += 1
        finally:
            model.train(was_training)
        if batches:
            for f in fisher.values():
                f /= batches
        return fisher

    # ---- hooks -------------------------------------------------------------------------------
    def before_stage(self, ctx, stage):
        self._terms = None

    def after_stage(self, ctx, stage):
        self._terms = None
        params = {k: p for k, p in ctx.model.named_parameters() if p.requires_grad}
        if not params or not stage.train_samples:
            return
        fisher = self._fisher(ctx, stage, params)
        anchor = {k: p.detach().float().clone() for k, p in params.items()}
        if self.options["online"] and self.penalties:
            old = self.penalties[0]
            gamma = float(self.options["gamma"])
            for k, f_old in old["fisher"].items():
                if k in fisher:
                    fisher[k] = fisher[k] + gamma * f_old.to(fisher[k].device)
                else:  # not trained this stage: keeps its (decayed) Fisher and its anchor
                    fisher[k] = gamma * f_old
                    anchor[k] = old["anchor"][k]
            self.penalties = [{"stage": stage.name, "fisher": fisher, "anchor": anchor}]
        else:
            self.penalties.append({"stage": stage.name, "fisher": fisher, "anchor": anchor})

    def _current_terms(self, ctx) -> list:
        if self._terms is None:
            params = dict(ctx.model.named_parameters())
            terms = []
            for pen in self.penalties:
                for k, f in pen["fisher"].items():
                    p = params.get(k)
                    if p is None or not p.requires_grad:
                        continue
                    terms.append((p, f.to(p.device), pen["anchor"][k].to(p.device)))
            self._terms = terms
        return self._terms

    def loss_terms(self, ctx, batch, outputs):
        if not self.penalties:
            return {}
        terms = self._current_terms(ctx)
        if not terms:
            return {}
        total = sum((f * (p.float() - a) ** 2).sum() for p, f, a in terms)
        return {"penalty": 0.5 * float(self.options["lambda"]) * total}

    def state_dict(self):
        return {"online": bool(self.options["online"]),
                "penalties": [{"stage": pen["stage"], "fisher": dict(pen["fisher"]),
                               "anchor": dict(pen["anchor"])} for pen in self.penalties]}

    def load_state_dict(self, state):
        self._terms = None
        self.penalties = [{"stage": pen["stage"],
                           "fisher": {k: v.float() for k, v in pen["fisher"].items()},
                           "anchor": {k: v.float() for k, v in pen["anchor"].items()}}
                          for pen in state.get("penalties") or []]

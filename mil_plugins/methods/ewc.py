"""``ewc``: Elastic Weight Consolidation (diagonal Fisher penalty), and its online variant.

Kirkpatrick et al., 2017, "Overcoming catastrophic forgetting in neural networks" (PNAS); online
EWC from Schwarz et al., 2018, "Progress & Compress".

Hooks:
  ``after_stage``   estimate the diagonal (empirical) Fisher of the parameters that were trainable
                    in the stage: per sample, the squared gradient of the sample's log-likelihood
                    *summed* over its answer tokens, averaged over ``fisher_samples`` of the stage's
                    own training samples (seeded; ``null`` = all), forwarded ``fisher_batch_size``
                    at a time through ``ctx.forward`` (every method's ``before_forward`` routing and
                    the recipe's precision, as in training); anchor ``theta*`` = the parameter
                    values after the stage. ``offload: true`` keeps both in CPU memory.
  ``loss_terms``    ``{"penalty": lambda/2 * sum_k sum_p F_k,p (theta_p - theta*_k,p)^2}`` over the
                    parameters trainable *now* that have a Fisher; absent before any stage has
                    finished (the first stage trains unregularised).
  ``state_dict``    the Fisher and anchor tensors (the checkpoint stores them as safetensors).

``online: false``: one (F_k, theta*_k) pair per finished stage, all penalised (the original
EWC). ``online: true``: a single pair, ``F <- gamma * F + F_new`` and ``theta* <- theta`` after
each stage (memory does not grow with the stages).

Gradients for the Fisher are taken with ``torch.autograd.grad`` on the unwrapped model in eval
mode (no dropout); ``.grad`` fields are not touched, so the optimiser never sees them
(:mod:`mil_plugins.methods.importance`, shared with ``tir``).
"""

from __future__ import annotations

import torch

from mil_plugins.methods.base import Method
from mil_plugins.methods.importance import per_sample_importance, sample_nll, seeded_subset


class EWC(Method):
    name = "ewc"
    default_options = {
        "lambda": 100.0,          # penalty weight
        "fisher_samples": 64,     # training samples of the stage used for the Fisher (null: all)
        "fisher_batch_size": 1,   # samples per forward of the Fisher pass (gradients stay per sample)
        "online": False,          # online EWC (one running Fisher) instead of one per stage
        "gamma": 1.0,             # online EWC: decay of the running Fisher
        "offload": False,         # keep Fisher and anchors in CPU memory (moved per step)
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
    def _store(self, t: torch.Tensor) -> torch.Tensor:
        """Where importance state lives: beside the parameter, or in CPU memory (``offload``)."""
        return t.detach().float().to("cpu") if self.options["offload"] else t.detach().float()

    def _fisher(self, ctx, stage, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """Mean over samples of the squared gradient of each sample's *summed* answer-token
        log-likelihood, on the training forward path (``ctx.forward``: method hooks, precision)."""
        picked = seeded_subset(ctx, list(stage.train_samples), self.options["fisher_samples"],
                               "ewc", stage.name)
        fisher = per_sample_importance(ctx, picked, params, self.options["fisher_batch_size"],
                                       sample_nll)
        return {k: self._store(f) for k, f in fisher.items()}

    # ---- hooks -------------------------------------------------------------------------------
    def before_stage(self, ctx, stage):
        self._terms = None

    def after_stage(self, ctx, stage):
        self._terms = None
        params = {k: p for k, p in ctx.model.named_parameters() if p.requires_grad}
        if not params or not stage.train_samples:
            return
        fisher = self._fisher(ctx, stage, params)
        anchor = {k: self._store(p).clone() for k, p in params.items()}
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
                    if self.options["offload"]:  # moved to the device per step, not kept there
                        terms.append((p, f, pen["anchor"][k]))
                    else:
                        terms.append((p, f.to(p.device), pen["anchor"][k].to(p.device)))
            self._terms = terms
        return self._terms

    def loss_terms(self, ctx, batch, outputs):
        if not self.penalties:
            return {}
        terms = self._current_terms(ctx)
        if not terms:
            return {}
        total = sum((f.to(p.device) * (p.float() - a.to(p.device)) ** 2).sum() for p, f, a in terms)
        return {"penalty": 0.5 * float(self.options["lambda"]) * total}

    def state_dict(self):
        return {"online": bool(self.options["online"]),
                "penalties": [{"stage": pen["stage"], "fisher": dict(pen["fisher"]),
                               "anchor": dict(pen["anchor"])} for pen in self.penalties]}

    def load_state_dict(self, state):
        self._terms = None
        self.penalties = [{"stage": pen["stage"],
                           "fisher": {k: self._store(v) for k, v in pen["fisher"].items()},
                           "anchor": {k: self._store(v) for k, v in pen["anchor"].items()}}
                          for pen in state.get("penalties") or []]

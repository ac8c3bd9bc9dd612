"""``tir``: task-similarity-informed regularisation (after He et al., arXiv 2311.16206).

He et al. ("Continual Instruction Tuning for Large Multimodal Models") weigh an importance penalty
per earlier task by how similar that task is to the new one. Their formulas are not public; the
rule here is **ours**:

* every stage gets a descriptor from its data in ``before_stage`` (frozen encoder features in a
  per-modality random projection, instruction and answer text in the LLM's embedding space:
  :mod:`mil_plugins.methods.descriptors`), kept in the method's state;
* after each stage, an importance ``Omega_k`` of every parameter trained in it and its anchor
  ``theta*_k`` are stored (``importance: fisher``: the per-sample empirical Fisher of ``ewc``, the
  squared gradient of each sample's summed answer log-likelihood; ``mas``: Memory Aware Synapses,
  Aljundi et al. 2018, the absolute gradient of the squared L2 norm of the logits at the answer
  positions, per sample);
* in stage ``t`` the penalty is::

      lambda/2 * sum_{k<t} w(s_{t,k}) * sum_p Omega_{k,p} (theta_p - theta*_{k,p})^2
      s_{t,k} = sim(e_t, e_k)                              (descriptors.similarity, in [-1, 1])
      w(s) = floor + (1 - floor) * clamp(1 - s, 0, 1)      direction: dissimilar (default)
      w(s) = floor + (1 - floor) * clamp(s, 0, 1)          direction: similar
      w(s) = 1                                             direction: none (plain per-stage EWC/MAS)

Why ``dissimilar`` by default (our reading): a new task like an old one moves the shared weights
in directions that also serve the old one, so it needs little constraint; a task unlike it pulls
them elsewhere, and that is where the old task must be held. The direction is an option because
the paper's is not public.

The weights of the current stage are in ``self.weights`` (``{stage: w}``, saved with the state)
and are recomputed from the stored descriptors on ``--resume``.
"""

from __future__ import annotations

import torch

from mil_plugins.methods import descriptors as D
from mil_plugins.methods.base import Method
from mil_plugins.methods.ewc import EWC
from mil_plugins.methods.importance import (ABSOLUTE, SQUARED, per_sample_importance,
                                            sample_nll, sample_output_norm, seeded_subset)

IMPORTANCE = ("fisher", "mas")
DIRECTIONS = ("dissimilar", "similar", "none")


def similarity_weight(s: float, direction: str, floor: float) -> float:
    """``w(s)`` of the module docstring."""
    if direction == "none":
        return 1.0
    base = 1.0 - s if direction == "dissimilar" else s
    return float(floor) + (1.0 - float(floor)) * min(1.0, max(0.0, base))


class TIR(EWC):
    name = "tir"
    default_options = {
        "lambda": 100.0,              # penalty weight
        "importance": "fisher",       # fisher | mas
        "importance_samples": 64,     # training samples of a stage for its importance (null: all)
        "importance_batch_size": 1,   # samples per forward of the importance pass
        "direction": "dissimilar",    # dissimilar | similar | none: which earlier stages weigh more
        "floor": 0.0,                 # smallest weight an earlier stage gets
        "descriptor_dim": 128,        # common width of the projected encoder features
        "descriptor_samples": 64,     # training samples of a stage for its descriptor
        "descriptor_weights": dict(D.DEFAULT_WEIGHTS),  # features / instruction / answer
        "offload": False,             # keep importance and anchors in CPU memory
    }

    def __init__(self, **options):
        Method.__init__(self, **options)
        o = self.options
        if o["importance"] not in IMPORTANCE:
            raise ValueError(f"method 'tir': importance must be one of {IMPORTANCE}, "
                             f"got {o['importance']!r}")
        if o["direction"] not in DIRECTIONS:
            raise ValueError(f"method 'tir': direction must be one of {DIRECTIONS}, "
                             f"got {o['direction']!r}")
        if not 0.0 <= float(o["floor"]) <= 1.0:
            raise ValueError(f"method 'tir': floor must be in [0, 1], got {o['floor']!r}")
        if o["importance_samples"] is not None and int(o["importance_samples"]) < 1:
            raise ValueError("method 'tir': importance_samples must be >= 1 or null (all samples)")
        for key in ("importance_batch_size", "descriptor_dim", "descriptor_samples"):
            if int(o[key]) < 1:
                raise ValueError(f"method 'tir': {key} must be >= 1, got {o[key]!r}")
        self.part_weights = D.check_weights("tir", o["descriptor_weights"])
        self.penalties: list[dict] = []
        self.descriptors: dict[str, dict] = {}  # stage name -> descriptor
        self.weights: dict[str, float] = {}     # earlier stage -> its weight in this stage
        self.similarities: dict[str, float] = {}
        self._terms = None

    # ---- descriptors and weights -------------------------------------------------------------
    def _describe(self, ctx, stage) -> None:
        if stage.name not in self.descriptors and stage.train_samples and ctx.make_loader:
            self.descriptors[stage.name] = D.stage_descriptor(
                ctx, stage, int(self.options["descriptor_dim"]), self.options["descriptor_samples"])

    def _reweigh(self, stage) -> None:
        """``self.weights`` of every stored penalty for ``stage`` from the descriptors."""
        me = self.descriptors.get(stage.name)
        self.weights, self.similarities = {}, {}
        for pen in self.penalties:
            other = self.descriptors.get(pen["stage"])
            s = D.similarity(me, other, self.part_weights) if me and other else 0.0
            self.similarities[pen["stage"]] = s
            self.weights[pen["stage"]] = similarity_weight(s, self.options["direction"],
                                                           self.options["floor"])
        self._terms = None

    # ---- importance --------------------------------------------------------------------------
    def _importance(self, ctx, stage, params: dict) -> dict[str, torch.Tensor]:
        picked = seeded_subset(ctx, list(stage.train_samples),
                               self.options["importance_samples"], "tir", stage.name)
        mas = self.options["importance"] == "mas"
        total = per_sample_importance(ctx, picked, params, self.options["importance_batch_size"],
                                      sample_output_norm if mas else sample_nll,
                                      ABSOLUTE if mas else SQUARED)
        return {k: self._store(t) for k, t in total.items()}

    # ---- hooks -------------------------------------------------------------------------------
    def before_stage(self, ctx, stage):
        self._describe(ctx, stage)
        self._reweigh(stage)

    def after_stage(self, ctx, stage):
        self._terms = None
        params = {k: p for k, p in ctx.model.named_parameters() if p.requires_grad}
        if not params or not stage.train_samples:
            return
        self._describe(ctx, stage)
        importance = self._importance(ctx, stage, params)
        anchor = {k: self._store(p).clone() for k, p in params.items()}
        self.penalties.append({"stage": stage.name, "fisher": importance, "anchor": anchor})

    def _current_terms(self, ctx) -> list:
        if self._terms is None:
            params = dict(ctx.model.named_parameters())
            terms = []
            for pen in self.penalties:
                w = float(self.weights.get(pen["stage"], 1.0))
                if w == 0.0:
                    continue
                for k, f in pen["fisher"].items():
                    p = params.get(k)
                    if p is None or not p.requires_grad:
                        continue
                    dev = "cpu" if self.options["offload"] else p.device
                    terms.append((p, w, f.to(dev), pen["anchor"][k].to(dev)))
            self._terms = terms
        return self._terms

    def loss_terms(self, ctx, batch, outputs):
        if not self.penalties:
            return {}
        terms = self._current_terms(ctx)
        if not terms:
            return {}
        total = sum(w * (f.to(p.device) * (p.float() - a.to(p.device)) ** 2).sum()
                    for p, w, f, a in terms)
        return {"penalty": 0.5 * float(self.options["lambda"]) * total}

    def state_dict(self):
        state = {"penalties": [{"stage": pen["stage"], "fisher": dict(pen["fisher"]),
                                "anchor": dict(pen["anchor"])} for pen in self.penalties]}
        state["importance"] = self.options["importance"]
        state["descriptors"] = {k: D.to_state(v) for k, v in self.descriptors.items()}
        state["weights"] = dict(self.weights)
        state["similarities"] = dict(self.similarities)
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        saved = (state or {}).get("importance")
        if saved and saved != self.options["importance"]:
            raise ValueError(f"method 'tir': the checkpoint's importance is {saved!r}, the recipe "
                             f"asks for {self.options['importance']!r}")
        self.descriptors = {k: D.from_state(v) for k, v in ((state or {}).get("descriptors") or {}).items()}
        self.weights = {k: float(v) for k, v in ((state or {}).get("weights") or {}).items()}
        self.similarities = {k: float(v) for k, v in ((state or {}).get("similarities") or {}).items()}

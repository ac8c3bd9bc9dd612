"""``tme``: task-similarity-informed model expansion (after He et al., arXiv 2311.16206).

Built on :mod:`~mil_plugins.methods.expansion`'s branches (a low-rank adapter beside the shared
connector and/or a PEFT LoRA adapter on the LLM, one slot per stage, frozen when not in use), with
the two decisions He et al. make from task similarity. Their formulas are not public; the rules
here are **ours**:

* **Which branch a stage trains** (``before_stage``). The stage's descriptor ``e_t`` is computed
  from its training data (:mod:`mil_plugins.methods.descriptors`: frozen encoder features in a
  per-modality random projection, instruction and answer text in the LLM's embedding space). With
  ``s* = max_k sim(e_t, e_k)`` over the earlier stages and ``b*`` the branch of that stage:
  ``s* >= reuse_threshold``: **reuse** -- the stage trains ``b*`` further (no new parameters; the
  earlier stages routed to ``b*`` share its update); ``init_threshold <= s* < reuse_threshold``:
  **initialise** a new branch from a copy of ``b*``; below: **add** a fresh branch (zero-initialised
  up-projection: it starts as a no-op). The first stage adds. Decisions and similarities are
  kept in the state (``decisions``).
* **Which branch an input takes** (``before_forward``, every forward after its stage). Each
  sample's own descriptor (its media's encoder features and its prompt's text; no answer, no task
  label, no stage id, no sample id) is compared with every trained stage's descriptor; the sample
  takes the branch of the nearest stage, across modalities. On the connector target the choice
  is per item (handed to the adapter stack as ``preset``); the LLM sees a whole batch, so on the
  LoRA target the batch takes the branch most of its samples chose (ties: the earliest branch).
  While a stage trains, its own modality's samples go to the branch it trains (as ``expansion``).

Options are ``expansion``'s plus the thresholds and the descriptor's. Everything else
(``train_base``, ``freeze_returning_inputs``, targets) behaves as in ``expansion``.
"""

from __future__ import annotations

from collections import Counter


from mil_plugins.methods import descriptors as D
from mil_plugins.methods.expansion import Expansion, stage_key, stage_route

ACTIONS = ("add", "init", "reuse")


def decide(similarities: dict[str, float], reuse: float, init: float) -> tuple[str, str | None, float]:
    """``(action, source stage key, s*)`` from the similarities to earlier stages."""
    if not similarities:
        return "add", None, 0.0
    src = max(similarities, key=lambda k: (similarities[k], k))
    s = float(similarities[src])
    if s >= reuse:
        return "reuse", src, s
    if s >= init:
        return "init", src, s
    return "add", src, s


class TME(Expansion):
    name = "tme"
    default_options = {
        **Expansion.default_options,
        "reuse_threshold": 0.9,    # s* at or above: train the most similar stage's branch further
        "init_threshold": 0.5,     # s* at or above (below reuse): a new branch copied from it
        "descriptor_dim": 128,     # common width of the projected encoder features
        "descriptor_weights": dict(D.DEFAULT_WEIGHTS),  # features / instruction / answer
    }
    conflicts = {
        **Expansion.conflicts,
        "expansion": "both add per-stage branches in the same places; use one of them",
    }

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if not -1.0 <= float(o["init_threshold"]) <= float(o["reuse_threshold"]) <= 1.01:
            raise ValueError(f"method 'tme': need -1 <= init_threshold <= reuse_threshold <= 1.01, "
                             f"got {o['init_threshold']!r}, {o['reuse_threshold']!r}")
        if int(o["descriptor_dim"]) < 1:
            raise ValueError("method 'tme': descriptor_dim must be >= 1")
        self.part_weights = D.check_weights("tme", o["descriptor_weights"])
        self.stage_descriptors: dict[str, dict] = {}  # stage key -> descriptor
        self.assign: dict[str, str] = {}              # stage key -> branch (adapter key) it trains
        self.decisions: dict[str, dict] = {}          # stage key -> {action, source, similarity}
        self.last_choice: list[str] | None = None     # per sample of the last routed batch

    # ---- decisions ---------------------------------------------------------------------------
    def _branches(self) -> list[str]:
        out: list[str] = []
        for key in self.assign.values():
            if key not in out:
                out.append(key)
        return out

    def _refresh_routes(self, ctx) -> None:
        branches = self._branches()
        mods = {st.modality for st in ctx.stages if stage_key(st.index) in self.assign}
        self.routes = {(m or "text"): list(branches) for m in mods}

    def before_stage(self, ctx, stage):
        key = stage_key(stage.index)
        if key not in self.assign:
            me = D.stage_descriptor(ctx, stage, int(self.options["descriptor_dim"]),
                                    self.options["descriptor_samples"]) \
                if stage.train_samples and ctx.make_loader is not None else {}
            self.stage_descriptors[key] = me
            sims = {k: D.similarity(me, d, self.part_weights)
                    for k, d in self.stage_descriptors.items() if k != key and k in self.assign}
            action, src, s = decide(sims, float(self.options["reuse_threshold"]),
                                    float(self.options["init_threshold"]))
            if action == "reuse":
                self.assign[key] = self.assign[src]
            else:
                if action == "init":
                    self._copy_adapter(self.assign[src], key)
                self.assign[key] = key
            self.decisions[key] = {"action": action, "source": src, "similarity": s,
                                   "branch": self.assign[key]}
        self._refresh_routes(ctx)
        self.forced = {stage_route(stage): self.assign[key]}
        self._sync()
        self._active = None

    # ---- trainable ---------------------------------------------------------------------------
    def trainable(self, ctx, stage, names):
        branch = self.assign.get(stage_key(stage.index), stage_key(stage.index))
        returning = bool(stage.modality) and any(st.modality == stage.modality for st in ctx.seen)
        return self._branch_trainable(ctx, stage, names, branch, returning)

    # ---- routing -----------------------------------------------------------------------------
    def _choose(self, ctx, batch: dict) -> list[str] | None:
        """Per sample, the branch of the nearest trained stage (from the sample's own input)."""
        stages = [k for k in self.assign if self.stage_descriptors.get(k)]
        if not stages:
            return None
        items = D.item_descriptors(ctx.model, batch, int(self.options["descriptor_dim"]),
                                   with_answer=False)
        sims = D.similarity_matrix(items, [self.stage_descriptors[k] for k in stages],
                                   self.part_weights)
        return [self.assign[stages[int(i)]] for i in sims.argmax(dim=1)]

    def before_forward(self, ctx, batch):
        per_item = batch.get("modalities") or []
        media = {m: x for m, x in (batch.get("media") or {}).items() if x is not None and len(x)}
        need = [m for m in media if m in self.routes and m not in self.forced]
        forced = all(m in self.forced for m in media) if media else "text" in self.forced
        self.last_choice = None
        if ("connector" in self.targets and need) or ("lora" in self.targets and not forced):
            self.last_choice = self._choose(ctx, batch)
        if self.last_choice is not None and "connector" in self.targets:
            stack = self._connector_stack()
            for m in need:
                owners = [i for i, mods in enumerate(per_item) for mm in mods if mm == m]
                if len(owners) != len(media[m]):
                    owners = list(range(len(media[m])))
                stack.preset[m] = [self.last_choice[i] for i in owners]
        super().before_forward(ctx, batch)

    def _route_of_batch(self, ctx, batch: dict) -> str | None:
        media = [m for m, x in (batch.get("media") or {}).items() if x is not None and len(x)]
        forced = {self.forced[m] for m in media if m in self.forced}
        if not media and "text" in self.forced:
            forced = {self.forced["text"]}
        if forced and len(forced) == 1 and all(m in self.forced for m in media):
            return forced.pop()
        if not self.last_choice:
            return None
        counts = Counter(self.last_choice)
        order = self._branches()
        return max(counts, key=lambda k: (counts[k], -order.index(k) if k in order else 0))

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state["assign"] = dict(self.assign)
        state["decisions"] = {k: dict(v) for k, v in self.decisions.items()}
        state["stage_descriptors"] = {k: D.to_state(v) for k, v in self.stage_descriptors.items()}
        return state

    def load_state_dict(self, state):
        if state and self.model is not None:
            self.assign = {str(k): str(v) for k, v in (state.get("assign") or {}).items()}
            self.decisions = {str(k): dict(v) for k, v in (state.get("decisions") or {}).items()}
            self.stage_descriptors = {str(k): D.from_state(v)
                                      for k, v in (state.get("stage_descriptors") or {}).items()}
        super().load_state_dict(state)

"""``expansion``: a new low-rank adapter per stage, frozen after its stage, routed from the input.

Parameter-isolation baseline: model expansion / per-task LoRA (He et al., 2023, "Continual
Instruction Tuning for Large Multimodal Models", arXiv 2311.16206). Every stage gets its own
adapter; once the stage is over the adapter is frozen. At inference an input's modality (which
placeholder it came in) gives the list of that modality's stage adapters, and the input's own
features choose among them (:func:`choose_adapters`: nearest stage descriptor, never a task label
or stage id), so when a modality returns its earlier stage's adapter stays reachable. Nothing shared keeps
training after the first stage, so earlier modalities cannot be overwritten; the price is
parameters that grow with the stages and no transfer between them.

Where the adapters go (``target``):

``connector`` -- the shared connector (``model.connector.mode: shared``)
    One ``LowRankAdapter`` per stage, parallel to ``connector.shared`` (``shared(x) + up(down(x)) *
    alpha/rank``, ``up`` zero-initialised, so a new adapter starts as a no-op). The adapters live in
    ``connector.expansion`` (parameters ``connector.expansion.adapters.stage<i>.{down,up}.weight``;
    the base projector keeps its names, so LLaVA export of the base still works). Routing needs no
    batch information: a pre-hook on each ``connector.input_layers[m]`` tells the adapter stack
    which modality is being projected and chooses each item's adapter from its features.
``lora`` -- the LLM's LoRA (``model.lora`` set)
    One PEFT LoRA adapter per stage (``peft_model.add_adapter("stage<i>", <the recipe's
    LoraConfig>)``), active together with the recipe's ``default`` adapter (the base). Routing is
    per batch: ``before_forward`` reads ``batch["modalities"]`` and the batch's media features and
    activates ``default`` + the chosen adapter; a batch routed to several raises ``ValueError``.
``auto`` (default) -- ``connector`` when the connector is shared and the recipe trains it, and
    ``lora`` when the LLM has LoRA and the recipe trains it (both when both).

Hooks:
  ``setup``          create every stage's adapters (up front, so that the engine's teacher copy
                     and checkpoints always see the same module structure)
  ``before_stage``   add the stage's adapter to its modality's routes (``"text"`` for a text-only
                     stage; a returning modality's new adapter starts from a copy of its latest
                     one, the earlier ones stay), compute the stage's descriptor, and route the
                     stage's own samples to its adapter while it trains (``after_stage`` ends that)
  ``trainable``      for each target the recipe trains this stage: drop the base (after the first
                     stage, see ``train_base``) and every other stage's adapter, add this stage's
  ``before_forward`` activate the LoRA adapters of the batch's modality (``lora`` target)
  ``state_dict``     adapters (key, stage, modality), routes and targets; ``load_state_dict``
                     re-creates missing adapters before the engine copies the weights in

``train_base: first_stage`` (default) trains the base (``connector.shared`` / ``default`` LoRA)
together with the first stage's adapter, then freezes it; ``never`` freezes it from the start (for
a pretrained connector). Modalities that no stage has routed yet (``eval.unseen``) run the base only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mil_plugins.methods._common import batch_routes
from mil_plugins.methods.base import Method
from mil_plugins.methods.expansion_modules import (PREFIX, TARGETS, TRAIN_BASE,  # noqa: F401
                                                   ConnectorExpansion, LowRankAdapter,
                                                   _lora_adapter_of, choose_adapters,
                                                   input_descriptor, stage_key, stage_route)


class Expansion(Method):
    name = "expansion"
    default_options = {
        "target": "auto",            # auto | connector | lora | both
        "rank": 8,                   # connector adapters' rank (LoRA adapters copy the recipe's config)
        "alpha": 16.0,               # connector adapters' scale numerator (alpha / rank)
        "dropout": 0.0,              # connector adapters' input dropout
        "train_base": "first_stage",  # first_stage | never
        "descriptor_samples": 64,    # training samples per stage for its routing descriptor
        "freeze_returning_inputs": True,  # a returning modality's input layer stays as it was
    }
    conflicts = {
        "joint": "expansion freezes each earlier stage's adapter and routes that modality to it, "
                 "so joint's earlier-stage samples would train nothing",
        "replay": "expansion freezes each earlier stage's adapter and routes that modality to it, "
                  "so replayed samples would train nothing",
    }

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if o["target"] not in TARGETS:
            raise ValueError(f"method 'expansion': target must be one of {TARGETS}, got {o['target']!r}")
        if o["train_base"] not in TRAIN_BASE:
            raise ValueError(f"method 'expansion': train_base must be one of {TRAIN_BASE}, "
                             f"got {o['train_base']!r}")
        if int(o["rank"]) < 1:
            raise ValueError("method 'expansion': rank must be >= 1")
        self.model: nn.Module | None = None
        self.targets: list[str] = []
        self.adapters: list[dict] = []       # [{"key", "stage", "index", "modality"}]
        self.routes: dict[str, list[str]] = {}  # route ("image", ..., "text") -> its stages' keys
        self.forced: dict[str, str] = {}     # during a stage: its route -> the adapter it trains
        self.descriptors: dict[str, torch.Tensor] = {}  # adapter key -> stage descriptor (CPU)
        self.base_adapters: list[str] = []   # PEFT adapters that existed before setup
        self._lora_cfg = None
        self._active: list[str] | None = None
        self._pending: dict | None = None
        self._layers: list | None = None     # the PEFT tuner layers of self.model (cached)

    # ---- structure ---------------------------------------------------------------------------
    def _resolve_targets(self, ctx) -> list[str]:
        model = ctx.model
        shared = getattr(model.connector, "mode", None) == "shared"
        peft = bool(getattr(model, "is_peft", False))
        want = self.options["target"]
        if want == "auto":
            recipe = ctx.recipe or {}
            groups = set((recipe.get("train") or {}).get("trainable") or ())
            for st in ctx.stages:
                groups |= set((st.config or {}).get("trainable") or ())
            out = []
            if shared and (not groups or "connector" in groups):
                out.append("connector")
            if peft and (not groups or "lora" in groups):
                out.append("lora")
            if not out:
                raise ValueError(
                    "method 'expansion': nothing to expand -- it needs a shared connector "
                    "(model.connector.mode: shared) trained by the recipe ('connector' group) or a "
                    "LoRA LLM (model.lora) trained by the recipe ('lora' group)")
            return out
        out = ["connector", "lora"] if want == "both" else [want]
        if "connector" in out and not shared:
            raise ValueError("method 'expansion': target 'connector' needs model.connector.mode: "
                             "shared (per-modality projectors are already isolated)")
        if "lora" in out and not peft:
            raise ValueError("method 'expansion': target 'lora' needs model.lora (a PEFT LLM)")
        return out

    def _connector_stack(self) -> ConnectorExpansion:
        return self.model.connector.expansion

    def _add_adapter(self, key: str) -> None:
        if "connector" in self.targets and key not in self._connector_stack().adapters:
            adapter = self._connector_stack().add(key)
            ref = next(self.model.connector.shared.parameters(), None)
            if ref is not None:
                adapter.to(device=ref.device, dtype=ref.dtype)
        if "lora" in self.targets and key not in self.model.llm.peft_config:
            llm = self.model.llm
            llm.add_adapter(key, copy.deepcopy(self._lora_cfg))
            ref = next(p for n, p in llm.named_parameters()
                       if _lora_adapter_of("llm." + n) in self.base_adapters)
            for n, p in llm.named_parameters():
                if _lora_adapter_of("llm." + n) == key:
                    p.data = p.data.to(device=ref.device, dtype=ref.dtype)

    def setup(self, ctx):
        self.model, self._layers = ctx.model, None
        self.targets = self._resolve_targets(ctx)
        if "connector" in self.targets and not hasattr(ctx.model.connector, "expansion"):
            conn = ctx.model.connector
            stack = ConnectorExpansion(conn.shared_dim, conn.llm_hidden, self.options["rank"],
                                       self.options["alpha"], self.options["dropout"])
            ref = next(conn.shared.parameters(), None)
            if ref is not None:
                stack.to(device=ref.device, dtype=ref.dtype)
            conn.expansion = stack
            stack.attach(conn)
        if "lora" in self.targets:
            llm = ctx.model.llm
            mine = {stage_key(st.index) for st in ctx.stages}
            self.base_adapters = [a for a in llm.peft_config if a not in mine]
            if not self.base_adapters:
                raise ValueError("method 'expansion': the PEFT LLM has no base adapter to copy")
            self._lora_cfg = copy.deepcopy(llm.peft_config[self.base_adapters[0]])
            self._lora_tuner_layers()  # fail early if peft has no tuner layers
        self.adapters = []
        for stage in ctx.stages:
            self._add_adapter(stage_key(stage.index))
            self.adapters.append({"key": stage_key(stage.index), "stage": stage.name,
                                  "index": stage.index, "modality": stage.modality})
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)

    def _lora_tuner_layers(self) -> list:
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            layers = [m for m in self.model.llm.modules() if isinstance(m, BaseTunerLayer)]
            if not layers:
                raise ValueError("method 'expansion': the PEFT LLM has no LoRA layers")
            self._layers = layers
        return self._layers

    def _sync(self) -> None:
        """Hand routes, the training stage's forced route and descriptors to the connector stack."""
        if "connector" in self.targets:
            stack = self._connector_stack()
            stack.routes = {r: list(k) for r, k in self.routes.items()}
            stack.forced = dict(self.forced)
            stack.descriptors = dict(self.descriptors)

    @staticmethod
    @torch.no_grad()
    def _features(model, modality: str, x: torch.Tensor, kind: str) -> torch.Tensor:
        """What the connector's input layer reads for ``x``: encoder features, standardised."""
        feats = model.encode(modality, x, kind)
        conn = model.connector
        if modality in getattr(conn, "standardizers", {}):
            feats = conn.standardizers[modality](feats)
        return feats

    @torch.no_grad()
    def _stage_descriptor(self, ctx, stage) -> torch.Tensor | None:
        """Mean of the per-item descriptors of (up to ``descriptor_samples``) training samples."""
        m = stage.modality
        samples = [s for s in stage.train_samples if s.media.get(m)]
        samples = samples[: int(self.options["descriptor_samples"])]
        total, count = None, 0
        for batch in ctx.make_loader(samples, mode="eval", batch_size=16):
            x = (batch.get("media") or {}).get(m)
            if x is None or len(x) == 0:
                continue
            d = input_descriptor(self._features(ctx.model, m, x, (batch.get("media_kind") or {})
                                                .get(m, "input")))
            total = d.sum(0) if total is None else total + d.sum(0)
            count += d.shape[0]
        if not count:
            return None
        return torch.nn.functional.normalize(total / count, dim=-1).cpu()

    def _copy_adapter(self, src: str, dst: str) -> None:
        with torch.no_grad():
            if "connector" in self.targets:
                stack = self._connector_stack()
                stack.adapters[dst].load_state_dict(stack.adapters[src].state_dict())
            if "lora" in self.targets:
                params = dict(self.model.llm.named_parameters())
                for n, p in params.items():
                    if _lora_adapter_of("llm." + n) == src:
                        other = n.replace(f".{src}.", f".{dst}.") if not n.endswith(f".{src}") \
                            else n[: -len(src)] + dst
                        if other in params:
                            params[other].copy_(p)

    # ---- hooks -------------------------------------------------------------------------------
    def before_stage(self, ctx, stage):
        key, route = stage_key(stage.index), stage_route(stage)
        keys = list(self.routes.get(route) or [])
        if key not in keys:
            if keys:  # a returning modality: a new adapter, started from its last one
                self._copy_adapter(keys[-1], key)
            keys.append(key)  # the earlier stages' adapters stay routable
        self.routes[route] = keys
        self.forced = {route: key}  # the stage's own samples train its adapter
        if stage.modality and key not in self.descriptors and ctx.make_loader is not None:
            d = self._stage_descriptor(ctx, stage)
            if d is not None:
                self.descriptors[key] = d
        self._sync()
        self._active = None

    def after_stage(self, ctx, stage):
        self.forced = {}  # from now on every route is chosen from the input
        self._sync()
        self._active = None

    def trainable(self, ctx, stage, names):
        key = stage_key(stage.index)
        returning = bool(stage.modality) and (self.routes.get(stage_route(stage)) or [key])[0] != key
        return self._branch_trainable(ctx, stage, names, key, returning)

    def _branch_trainable(self, ctx, stage, names, branch: str, returning: bool) -> set[str]:
        """The engine's trainable ``names`` with the shared base swapped for ``branch``'s adapters
        (connector and/or LoRA; the base trains too in the first stage under ``train_base:
        first_stage``). A ``returning`` modality's input layer is frozen by option: it also feeds
        its earlier stages' adapters."""
        keep_base = self.options["train_base"] == "first_stage" and not ctx.seen
        all_names = [n for n, _ in ctx.model.named_parameters()]
        out = set(names)
        if self.options["freeze_returning_inputs"] and returning:
            own = f"connector.input_layers.{stage.modality}."
            out = {n for n in out if not n.startswith(own)}
        if "connector" in self.targets:
            trains = any(n.startswith("connector.shared.") for n in names)
            out = {n for n in out if not n.startswith(PREFIX)
                   and (keep_base or not n.startswith("connector.shared."))}
            if trains:
                mine = f"{PREFIX}adapters.{branch}."
                out |= {n for n in all_names if n.startswith(mine)}
        if "lora" in self.targets:
            trains = any(_lora_adapter_of(n) is not None for n in names)
            out = {n for n in out if _lora_adapter_of(n) is None
                   or (keep_base and _lora_adapter_of(n) in self.base_adapters)}
            if trains:
                out |= {n for n in all_names if _lora_adapter_of(n) == branch}
        return out

    def _modality_keys(self, ctx, batch: dict, modality: str) -> set[str]:
        keys = list(self.routes.get(modality) or [])
        if not keys:
            return set()
        if modality in self.forced:
            return {self.forced[modality]}
        x = (batch.get("media") or {}).get(modality)
        if len(keys) == 1 or x is None or len(x) == 0:
            return {keys[-1]}
        feats = self._features(ctx.model, modality, x,
                               (batch.get("media_kind") or {}).get(modality, "input"))
        return set(choose_adapters(feats, keys, self.descriptors))

    def _route_of_batch(self, ctx, batch: dict) -> str | None:
        per_sample = batch_routes(batch)
        if not per_sample and batch.get("media"):
            per_sample = ["+".join(sorted(batch["media"]))]
        modalities = sorted({m for route in per_sample if route != "text" for m in route.split("+")})
        keys: set[str] = set()
        for m in modalities:
            keys |= self._modality_keys(ctx, batch, m)
        if len(keys) > 1:
            raise ValueError(
                f"method 'expansion' (target lora) routes whole batches, but this batch mixes samples "
                f"{sorted(set(per_sample))} are routed to different adapters {sorted(keys)}; use "
                f"single-modality batches of one stage's data, or target: connector (routed per "
                f"sample)")
        if keys:
            return keys.pop()
        text = self.routes.get("text") or []
        return self.forced.get("text") or (text[-1] if text else None)

    def before_forward(self, ctx, batch):
        if "lora" not in self.targets:
            return
        key = self._route_of_batch(ctx, batch)
        active = list(self.base_adapters) + ([key] if key is not None else [])
        layers = self._lora_tuner_layers()
        if self._active == active and list(layers[0].active_adapters) == active:
            return
        for layer in layers:  # set_adapter flips requires_grad; keep the engine's choice
            flags = [(p, p.requires_grad) for p in layer.parameters()]
            layer.set_adapter(active)
            for p, flag in flags:
                p.requires_grad_(flag)
        self._active = active

    def state_dict(self):
        return {"targets": list(self.targets), "adapters": [dict(a) for a in self.adapters],
                "routes": {r: list(k) for r, k in self.routes.items()},
                "descriptors": dict(self.descriptors),
                "options": {k: self.options[k] for k in ("rank", "alpha", "train_base")}}

    def load_state_dict(self, state):
        if not state:
            return
        if self.model is None:  # not set up yet: applied at the end of setup
            self._pending = state
            return
        saved = list(state.get("targets") or [])
        if saved and saved != self.targets:
            raise ValueError(f"method 'expansion': the checkpoint has adapters on {saved} but this "
                             f"recipe expands {self.targets} (was the model or target changed?)")
        if "connector" in self.targets:
            stack = self._connector_stack()
            rank = int((state.get("options") or {}).get("rank", stack.rank))
            if rank != stack.rank:
                raise ValueError(f"method 'expansion': checkpoint adapters have rank {rank}, the "
                                 f"recipe asks for {stack.rank}")
        known = {a["key"] for a in self.adapters}
        for entry in state.get("adapters") or []:
            if entry["key"] not in known:
                self._add_adapter(entry["key"])
                self.adapters.append(dict(entry))
                known.add(entry["key"])
        routes = {}
        for route, keys in (state.get("routes") or {}).items():  # older checkpoints: one key each
            routes[str(route)] = [str(keys)] if isinstance(keys, str) else [str(k) for k in keys]
        self.routes = routes
        self.descriptors = {str(k): v.detach().float().cpu()
                            for k, v in (state.get("descriptors") or {}).items()}
        self._sync()
        self._active = None

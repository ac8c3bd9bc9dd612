"""``routed_experts``: per-modality low-rank experts inside the LLM, routed by each token's modality.

After Libra (Xu et al., 2024, "Libra: Building Decoupled Vision System on Large Language Models",
arXiv 2405.10140, code YifanXu74/Libra), used as a modality-incremental method: every modality
that a stage brings gets its own expert weights on the targeted LLM projections, applied only to
that modality's tokens; text tokens take the original weights exactly. A low-rank cross-modal
bridge adjusts keys and values where attention crosses between a modality and text. Earlier
modalities' experts and bridges are frozen, so nothing a later stage trains touches them.

Per targeted linear layer ``W`` (default: attention q/k/v/o and MLP gate/up/down of every layer)
and modality ``m``::

    y = W x                                      text tokens (exactly the base layer)
    y = W x + (alpha / rank) * U_m D_m x         tokens of modality m (U_m zero-initialised)

Bridge (``k_proj`` / ``v_proj`` of each layer, rank ``bridge_rank``, up-projection zero-initialised):
keys and values of ``m``'s tokens as seen by *text* queries get ``+ B^{m->text}(h)``; keys and values
of text tokens as seen by ``m``'s queries get ``+ B^{text->m}(h)``; a modality's own tokens (and
other modalities' tokens) are seen unadjusted. The text view is the one the layer computes and
caches; for the queries of each modality present in the call, a forward hook on the attention
module re-runs it in that modality's view (without the cache) and takes those query rows. Generated
tokens are text, so KV-cached generation only ever needs the cached text view.

Routing uses only the token-modality map (which placeholder a token came from); see
:mod:`mil_plugins.model.layer_modules`.

Hooks: ``setup`` (experts and bridges of every stage's modality, up front), ``trainable`` (the
stage's modality's experts and bridges; the shared base -- ``connector.shared`` and the LLM --
frozen after the first stage with ``train_base: first_stage``), ``param_groups`` (``lr_scale``),
state (the layout, checked on resume).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mil_plugins.methods.base import Method

NAME = "routed_experts"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BRIDGED = ("k_proj", "v_proj")
TRAIN_BASE = ("first_stage", "never", "always")


class LowRank(nn.Module):
    """``x -> scale * up(down(x))``; ``up`` starts at zero (a no-op)."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


class BridgeView:
    """Which view an attention call computes: ``None`` = text's (the cached one), or a modality."""

    def __init__(self) -> None:
        self.modality: str | None = None


def _idle(modules, y: torch.Tensor) -> torch.Tensor:
    """``y`` plus a zero touching every trainable parameter of ``modules`` (DDP / ZeRO contract)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if params and torch.is_grad_enabled():
        y = y + (sum(p.sum() for p in params) * 0.0).to(y.dtype)
    return y


class ExpertLayer(nn.Module):
    """The method module beside one LLM linear layer: experts per modality, bridges on k/v."""

    def __init__(self, d_in: int, d_out: int, modalities: list[str], rank: int, alpha: float,
                 bridge_rank: int | None, view: BridgeView | None):
        super().__init__()
        self.experts = nn.ModuleDict({m: LowRank(d_in, d_out, rank, alpha / rank)
                                      for m in modalities})
        self.bridges = nn.ModuleDict()
        self.view = view
        if bridge_rank:
            for m in modalities:
                self.bridges[f"{m}-to_text"] = LowRank(d_in, d_out, bridge_rank, 1.0)
                self.bridges[f"{m}-from_text"] = LowRank(d_in, d_out, bridge_rank, 1.0)

    def forward(self, x: torch.Tensor, y: torch.Tensor, route) -> torch.Tensor:
        idle = []
        for m, expert in self.experts.items():
            mask = route.mask(m)
            if bool(mask.any()):
                y = torch.where(mask.unsqueeze(-1), y + expert(x).to(y.dtype), y)
            else:
                idle.append(expert)
        if len(self.bridges):
            view = self.view.modality if self.view is not None else None
            for m in self.experts:
                to_text, from_text = self.bridges[f"{m}-to_text"], self.bridges[f"{m}-from_text"]
                if view is None:  # text queries: m's keys/values bridged
                    mask = route.mask(m)
                    used = bool(mask.any())
                    if used:
                        y = torch.where(mask.unsqueeze(-1), y + to_text(x).to(y.dtype), y)
                    idle += [from_text] + ([] if used else [to_text])
                elif view == m:   # m's queries: text keys/values bridged
                    mask = route.mask("text")
                    y = torch.where(mask.unsqueeze(-1), y + from_text(x).to(y.dtype), y)
                    idle.append(to_text)
                else:
                    idle += [to_text, from_text]
        return _idle(idle, y)


class AttentionViews(nn.Module):
    """Forward hook of one attention module: rows of each modality's queries from its own view.

    Holds no parameters; a module so that a deep copy of the model (the teacher) hooks its copy.
    """

    def __init__(self, routing, view: BridgeView, modalities: list[str]):
        super().__init__()
        self.routing, self.view, self.modalities = routing, view, list(modalities)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        ids = self.routing.llm
        if self.view.modality is not None or ids is None:
            return output
        attn, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, ())
        names = self.routing.names
        for m in self.modalities:
            if m not in names:
                continue
            mask = ids == names.index(m)
            if not bool(mask.any()):
                continue
            cache = kwargs.get("past_key_values")
            if cache is not None and int(cache.get_seq_length()) != ids.shape[1]:
                raise RuntimeError(f"{NAME}: tokens of {m!r} after earlier cached tokens: the "
                                   f"bridge needs the whole prompt in one call")
            self.view.modality = m
            try:
                again = module(*args, **{**kwargs, "past_key_values": None})
            finally:
                self.view.modality = None
            again = again[0] if isinstance(again, tuple) else again
            attn = torch.where(mask.to(attn.device).unsqueeze(-1), again, attn)
        return (attn, *rest) if isinstance(output, tuple) else attn


class RoutedExperts(Method):
    name = NAME
    default_options = {
        "targets": list(DEFAULT_TARGETS),  # LLM linear layers (PEFT target_modules style)
        "rank": 4,                         # expert rank
        "alpha": 8.0,                      # expert scale numerator (alpha / rank)
        "bridge": True,                    # cross-modal bridge on k_proj / v_proj
        "bridge_rank": 4,
        "train_base": "first_stage",       # first_stage | never | always (connector.shared + llm)
        "lr_scale": None,                  # experts' and bridges' lr = lr * lr_scale (None: lr)
    }
    conflicts = {
        "expansion": "both route each modality to modules of its own; use one of them",
    }

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if o["train_base"] not in TRAIN_BASE:
            raise ValueError(f"method {NAME!r}: train_base must be one of {TRAIN_BASE}, "
                             f"got {o['train_base']!r}")
        for key in ("rank", "bridge_rank"):
            if int(o[key]) < 1:
                raise ValueError(f"method {NAME!r}: {key} must be >= 1, got {o[key]!r}")
        if not o["targets"]:
            raise ValueError(f"method {NAME!r}: targets must name at least one linear layer")
        self.modalities: list[str] = []
        self.layers: dict[str, ExpertLayer] = {}

    # ---- structure -----------------------------------------------------------------------------
    def setup(self, ctx) -> None:
        o = self.options
        model = ctx.model
        self.modalities = []
        for st in ctx.stages:
            if st.modality and st.modality not in self.modalities:
                self.modalities.append(st.modality)
        if not self.modalities:
            raise ValueError(f"method {NAME!r}: the recipe has no modality stage to add experts for")
        views: dict[str, BridgeView] = {}

        def make(name: str, linear: nn.Linear) -> ExpertLayer:
            attn, _, leaf = name.rpartition(".")
            bridged = bool(o["bridge"]) and leaf in BRIDGED
            view = views.setdefault(attn, BridgeView()) if bridged else None
            return ExpertLayer(linear.in_features, linear.out_features, self.modalities,
                               int(o["rank"]), float(o["alpha"]),
                               int(o["bridge_rank"]) if bridged else None, view)

        self.layers = model.wrap_linears(NAME, list(o["targets"]), make)
        if o["bridge"] and not views:
            raise ValueError(f"method {NAME!r}: bridge needs k_proj or v_proj among the targets")
        llm = model.base_llm()
        for attn, view in views.items():
            hook = AttentionViews(model.token_modality, view, self.modalities)
            key = f"{NAME}-views-{attn}".replace(".", "-")
            model.layer_modules[key] = hook
            llm.get_submodule(attn).register_forward_hook(hook.hook, with_kwargs=True)

    def _own(self, name: str, modality: str) -> bool:
        tag = f".modules_by_owner.{NAME}."
        if tag not in name:
            return False
        rest = name.split(tag, 1)[1]
        return rest.startswith((f"experts.{modality}.", f"bridges.{modality}-to_text.",
                                f"bridges.{modality}-from_text."))

    def trainable(self, ctx, stage, names):
        if stage.modality is None:
            return names
        base = {n for n in names if n.startswith(("llm.", "connector.shared."))}
        drop = (self.options["train_base"] == "never"
                or (self.options["train_base"] == "first_stage" and stage.index > 0))
        if drop:
            names = set(names) - base
        own = {n for n, _ in ctx.model.named_parameters() if self._own(n, stage.modality)}
        return set(names) | own

    def param_groups(self, ctx, stage):
        scale = self.options["lr_scale"]
        if scale is None or stage is None or stage.modality is None:
            return []
        names = [n for n, _ in ctx.model.named_parameters() if self._own(n, stage.modality)]
        return [{"names": names, "lr_scale": float(scale)}]

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"modalities": list(self.modalities), "layers": sorted(self.layers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and (state.get("modalities") != self.modalities
                      or state.get("layers") != sorted(self.layers)):
            raise ValueError(f"method {NAME!r}: the checkpoint's experts ({state.get('modalities')} "
                             f"on {len(state.get('layers') or [])} layers) differ from the recipe's "
                             f"({self.modalities} on {len(self.layers)} layers)")

"""The connector: each modality's encoder features -> the LLM's embedding width.

Two modes, chosen per recipe (see DESIGN.md, "Where forgetting comes from"):

``per_modality``
    One LLaVA projector per modality, ``projectors[m] = build_projector(type_m, enc_hidden_m, H)``.
    Modalities are isolated: training one never touches another's parameters.

``shared``
    Per-modality input layers ``input_layers[m] = nn.Linear(enc_hidden_m, shared_dim)`` and ONE
    shared projector ``shared = build_projector(type, shared_dim, H)`` used by every modality.
    What is learned for one modality can help -- or overwrite -- another: the setting in which
    continual methods can be told apart.

Submodule names are stable and part of the API (method plugins wrap or augment them, checkpoints
and optimiser parameter groups key on them)::

    projectors.<modality>.*     per_modality mode, e.g. projectors.audio.0.weight (LLaVA layout)
    input_layers.<modality>.*   shared mode, e.g. input_layers.audio.weight / .bias
    shared.*                    shared mode, e.g. shared.0.weight, shared.2.bias (LLaVA layout)

Optionally (``standardize=True``) every modality's features first pass a fixed, per-dimension
standardiser ``standardizers.<modality>`` (buffers ``mean``, ``inv_std``), fitted once from the
modality's training features when its first stage starts (:meth:`Connector.fit_standardizer`).
Frozen random or pretrained encoders give features whose across-sample variation is small next to
a shared offset; removing it is what a linear probe's standard scaling does, and without it a tiny
connector cannot pass on attributes a probe reads perfectly. The map is affine, so LLaVA export
folds it into the first linear layer exactly.

A method plugin may replace ``connector.shared`` (or ``connector.projectors[m]``) by a module that
wraps it (adapters, gates); :meth:`Connector.forward` only calls it as ``module(x)``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from mil_plugins.projectors import build_projector

MODES = ("per_modality", "shared")
_MLP = re.compile(r"^mlp(\d+)x_gelu$")


class Standardizer(nn.Module):
    """``(x - mean) * inv_std`` per feature dimension; identity until fitted."""

    def __init__(self, shape: int | tuple[int, ...]):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("inv_std", torch.ones(shape))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, eps: float = 1e-6) -> None:
        """Fit to ``features [N, T, D]``: statistics over samples (and tokens, when per dim)."""
        flat = features.detach().reshape(-1, *self.mean.shape).double()
        self.mean.copy_(flat.mean(0).to(self.mean.dtype))
        self.inv_std.copy_((1.0 / (flat.std(0, unbiased=False) + eps)).to(self.inv_std.dtype))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) * self.inv_std.to(x.dtype)

    def fold_into(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W', b')`` with ``W' x + b' == W standardize(x) + b`` (per-dim statistics)."""
        if self.mean.dim() != 1:
            raise ValueError("only a per-dimension standardiser folds into a per-token linear layer")
        w = weight.float() * self.inv_std.float()[None, :]
        b = bias.float() - w @ self.mean.float()
        return w.to(weight.dtype), b.to(bias.dtype)


class TokenMixer(nn.Module):
    """A shared-mode input layer that reads all ``T`` tokens of a sample at once:
    ``[N, T, D] -> flatten -> Linear(T * D, K * shared_dim) -> [N, K, shared_dim]``.

    What a linear probe on the concatenated tokens sees, the connector can pass on: attributes
    that live in *where* a token is (left/right, motion across frames, pitch in a spectrogram)
    reach the LLM as content of ``K`` tokens, instead of asking a frozen LLM to compare token
    positions. Not a LLaVA layout (LLaVA projectors act per token): export to HF Llava needs the
    image modality per token (``mix_tokens_by_modality: {image: null}`` or ``mix_tokens: null``)."""

    def __init__(self, num_tokens: int, in_dim: int, out_tokens: int, out_dim: int):
        super().__init__()
        self.num_tokens, self.out_tokens, self.out_dim = int(num_tokens), int(out_tokens), int(out_dim)
        self.linear = nn.Linear(self.num_tokens * in_dim, self.out_tokens * self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"token mixer expects {self.num_tokens} tokens, got {tuple(x.shape)}")
        return self.linear(x.reshape(x.shape[0], -1)).view(x.shape[0], self.out_tokens, self.out_dim)


class Connector(nn.Module):
    """Maps ``features [N, T, D_m]`` of modality ``m`` to ``[N, T, llm_hidden]``.

    Args:
        llm_hidden: the LLM's hidden size ``H``.
        mode: ``"per_modality"`` or ``"shared"``.
        projector_type: the shared projector's LLaVA name (shared mode; default ``mlp2x_gelu``).
            In per_modality mode it is the default for :meth:`add_modality` calls that pass none.
        shared_dim: width of the shared space (shared mode; default ``llm_hidden``).
        standardize: give every modality a :class:`Standardizer` in front (see the module doc).
        mix_tokens: shared mode: every modality's input layer is a :class:`TokenMixer` writing
            this many tokens (``None``: per-token linear input layers, LLaVA's layout).
        mix_tokens_by_modality: ``{modality: K or None}`` overriding ``mix_tokens`` for those
            modalities, e.g. ``{"image": None}`` keeps the image per token (exportable to
            ``LlavaForConditionalGeneration``) while the others mix.
    """

    def __init__(self, llm_hidden: int, mode: str = "per_modality",
                 projector_type: str | None = None, shared_dim: int | None = None,
                 standardize: bool = False, mix_tokens: int | None = None,
                 mix_tokens_by_modality: dict[str, int | None] | None = None):
        super().__init__()
        self.mix_tokens = int(mix_tokens) if mix_tokens else None
        self.mix_tokens_by_modality = {str(m): int(k) if k else None
                                       for m, k in (mix_tokens_by_modality or {}).items()}
        if (self.mix_tokens or any(self.mix_tokens_by_modality.values())) and mode != "shared":
            raise ValueError("connector mix_tokens needs mode: shared (the mixer is the input layer)")
        self.in_tokens: dict[str, int] = {}
        self.standardize = bool(standardize)
        self.standardizers = nn.ModuleDict()
        if mode not in MODES:
            raise ValueError(f"connector mode must be one of {MODES}, got {mode!r}")
        self.llm_hidden = int(llm_hidden)
        self.mode = mode
        self.projector_type = projector_type
        self.projectors = nn.ModuleDict()
        self.input_layers = nn.ModuleDict()
        self.enc_hidden: dict[str, int] = {}
        self.projector_types: dict[str, str] = {}
        if mode == "shared":
            self.projector_type = projector_type or "mlp2x_gelu"
            self.shared_dim = int(shared_dim or llm_hidden)
            self.shared = build_projector(self.projector_type, self.shared_dim, self.llm_hidden)
        else:
            self.shared_dim = None
            self.shared = None

    # ---- structure -----------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        """Modality names in the order they were added."""
        return list(self.enc_hidden)

    def __contains__(self, modality: str) -> bool:
        return modality in self.enc_hidden

    def add_modality(self, name: str, enc_hidden: int, projector_type: str | None = None,
                     num_tokens: int | None = None) -> None:
        """Add the entry for a modality (a modality arriving in a later stage).

        per_modality: builds ``projectors[name]`` (``projector_type``, else the connector's
        default, else ``mlp2x_gelu``). shared: builds ``input_layers[name]``; ``projector_type``
        is ignored (the shared projector is shared). The new parameters follow the dtype/device
        of the existing ones.
        """
        if name in self.enc_hidden:
            raise ValueError(f"connector already has modality {name!r}")
        enc_hidden = int(enc_hidden)
        ref = next(self.parameters(), None)
        mix = self.mix_tokens_of(name)
        if self.mode == "per_modality":
            ptype = projector_type or self.projector_type or "mlp2x_gelu"
            module = build_projector(ptype, enc_hidden, self.llm_hidden)
            self.projectors[name] = module
        else:
            ptype = self.projector_type
            if mix:
                if not num_tokens:
                    raise ValueError(f"connector mix_tokens: the number of tokens of {name!r} is needed")
                module = TokenMixer(num_tokens, enc_hidden, mix, self.shared_dim)
                self.in_tokens[name] = int(num_tokens)
            else:
                module = nn.Linear(enc_hidden, self.shared_dim)
            self.input_layers[name] = module
        if ref is not None:
            module.to(device=ref.device, dtype=ref.dtype)
        if self.standardize:  # per (token, dim) when tokens are mixed, else per dim
            shape = (int(num_tokens), enc_hidden) if mix else (enc_hidden,)
            self.standardizers[name] = Standardizer(shape).to(
                device=ref.device if ref is not None else None)
        self.enc_hidden[name] = enc_hidden
        self.projector_types[name] = ptype

    def modules_for(self, modality: str) -> list[nn.Module]:
        """The modules that ``forward(modality, .)`` runs, in order."""
        self._check(modality)
        if self.mode == "per_modality":
            return [self.projectors[modality]]
        return [self.input_layers[modality], self.shared]

    def mix_tokens_of(self, modality: str) -> int | None:
        """How many tokens ``modality``'s token mixer writes (``mix_tokens`` unless
        ``mix_tokens_by_modality`` overrides it), or ``None`` for a per-token input layer."""
        if modality in self.mix_tokens_by_modality:
            return self.mix_tokens_by_modality[modality]
        return self.mix_tokens

    def output_tokens(self, modality: str, num_tokens: int) -> int:
        """How many tokens ``forward(modality, .)`` makes of ``num_tokens`` encoder tokens."""
        return self.mix_tokens_of(modality) or int(num_tokens)

    def needs_fit(self, modality: str) -> bool:
        """Whether ``modality`` has a standardiser that has not been fitted yet."""
        std = self.standardizers[modality] if modality in self.standardizers else None
        return std is not None and not bool(std.fitted)

    def fit_standardizer(self, modality: str, features: torch.Tensor) -> None:
        """Fit ``modality``'s standardiser to its encoder features ``[N, T, D]``."""
        self._check(modality)
        self.standardizers[modality].fit(features)

    def parameters_for(self, modality: str) -> list[nn.Parameter]:
        """Parameters that ``forward(modality, .)`` uses (shared ones included)."""
        return [p for m in self.modules_for(modality) for p in m.parameters()]

    def _check(self, modality: str) -> None:
        if modality not in self.enc_hidden:
            raise KeyError(f"connector has no modality {modality!r}; it has {self.modalities}")

    # ---- compute -------------------------------------------------------------------------------
    def forward(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        """``features [N, T, D_m] -> [N, T, llm_hidden]``."""
        self._check(modality)
        if features.shape[-1] != self.enc_hidden[modality]:
            raise ValueError(f"connector[{modality!r}] expects features of width "
                             f"{self.enc_hidden[modality]}, got shape {tuple(features.shape)}")
        x = features
        if modality in self.standardizers:
            x = self.standardizers[modality](x)
        for module in self.modules_for(modality):
            p = next(module.parameters(), None)
            if p is not None and x.dtype != p.dtype:
                x = x.to(p.dtype)
            x = module(x)
        return x

    def dummy_output(self, modality: str) -> torch.Tensor:
        """``0 * connector(zeros(1, 1, D_m)).sum()``: a zero scalar that puts every parameter of
        ``modality``'s path in the autograd graph (LLaVA's trick for batches lacking a modality,
        so DeepSpeed/DDP see a gradient -- zero -- for every trainable parameter)."""
        ref = next(iter(self.parameters_for(modality)), None)
        kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        x = torch.zeros(1, self.in_tokens.get(modality, 1), self.enc_hidden[modality], **kw)
        return self.forward(modality, x).sum() * 0.0

    # ---- (de)serialisation ---------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_config` rebuilds the same structure."""
        return {
            "mode": self.mode,
            "llm_hidden": self.llm_hidden,
            "projector_type": self.projector_type,
            "shared_dim": self.shared_dim,
            "standardize": self.standardize,
            "mix_tokens": self.mix_tokens,
            "mix_tokens_by_modality": dict(self.mix_tokens_by_modality),
            "modalities": {m: {"enc_hidden": self.enc_hidden[m], "num_tokens": self.in_tokens.get(m),
                               "projector_type": self.projector_types[m]}
                           for m in self.modalities},
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Connector":
        conn = cls(cfg["llm_hidden"], cfg["mode"], cfg.get("projector_type"), cfg.get("shared_dim"),
                   bool(cfg.get("standardize", False)), cfg.get("mix_tokens"),
                   cfg.get("mix_tokens_by_modality"))
        for m, entry in (cfg.get("modalities") or {}).items():
            conn.add_modality(m, entry["enc_hidden"], entry.get("projector_type"),
                              entry.get("num_tokens"))
        return conn

    def input_layer_state(self, modality: str) -> dict[str, torch.Tensor]:
        """shared mode: the state dict (``weight``, ``bias``) of ``input_layers[modality]``."""
        self._check(modality)
        if self.mode != "shared":
            raise ValueError("input_layer_state: only the shared mode has input layers")
        if self.mix_tokens_of(modality):
            raise ValueError(f"the input layer of {modality!r} mixes tokens (connector mix_tokens: "
                             f"{self.mix_tokens_of(modality)}); LLaVA projectors act per token, so it "
                             f"has no LLaVA layout: train with model.connector.mix_tokens_by_modality: "
                             f"{{{modality}: null}} (or mix_tokens: null) to export")
        sd = {k: v.detach().clone() for k, v in self.input_layers[modality].state_dict().items()}
        if modality in self.standardizers:  # the standardiser folded in: raw features -> shared_dim
            sd["weight"], sd["bias"] = self.standardizers[modality].fold_into(sd["weight"], sd["bias"])
        return sd

    def mixer_state(self, modality: str) -> dict[str, torch.Tensor]:
        """shared mode with ``mix_tokens``: the token mixer of ``modality`` as one linear map of
        the flattened raw features ``[T * D] -> [K * shared_dim]`` (standardiser folded in)."""
        self._check(modality)
        mixer = self.input_layers[modality]
        if not isinstance(mixer, TokenMixer):
            raise ValueError(f"the input layer of {modality!r} is not a token mixer")
        w = mixer.linear.weight.detach().float().clone()
        b = mixer.linear.bias.detach().float().clone()
        if modality in self.standardizers:
            std = self.standardizers[modality]
            w = w * std.inv_std.float().reshape(1, -1)
            b = b - w @ std.mean.float().reshape(-1)
        dtype = mixer.linear.weight.dtype
        return {"weight": w.to(dtype), "bias": b.to(dtype)}

    def llava_projector_state(self, modality: str, fold_input_layer: bool = False
                              ) -> tuple[str, int, dict[str, torch.Tensor]]:
        """``(mm_projector_type, mm_hidden_size, state_dict)`` in LLaVA's layout, for export.

        per_modality: ``projectors[modality]``, ``mm_hidden_size`` = the encoder width.

        shared: by default the shared projector with ``mm_hidden_size = shared_dim``; the input
        layer is *not* included (get it from :meth:`input_layer_state`). With
        ``fold_input_layer=True`` the input layer is folded into the projector's first linear
        layer (two affine maps compose exactly: ``W = W1 W0, b = W1 b0 + b1``), giving a stand-alone
        LLaVA projector from the encoder width (``mm_hidden_size = enc_hidden``) with the same
        outputs; possible when the shared projector is a plain ``linear``, ``mlp{N}x_gelu`` or
        ``identity`` (not when a method plugin has wrapped it).
        """
        self._check(modality)
        if self.mode == "per_modality":
            sd = {k: v.detach().clone() for k, v in self.projectors[modality].state_dict().items()}
            ptype = self.projector_types[modality]
            if modality in self.standardizers:
                first = "weight" if "weight" in sd else "0.weight"
                if first not in sd:
                    raise ValueError(f"cannot fold the feature standardiser of {modality!r} into "
                                     f"projector {ptype!r} with parameters {sorted(sd)}")
                bias = first.replace("weight", "bias")
                sd[first], sd[bias] = self.standardizers[modality].fold_into(sd[first], sd[bias])
            return ptype, self.enc_hidden[modality], sd
        sd = {k: v.detach().clone() for k, v in self.shared.state_dict().items()}
        ptype = self.projector_type
        if not fold_input_layer:
            return ptype, self.shared_dim, sd
        folded = self.input_layer_state(modality)
        w0, b0 = folded["weight"], folded["bias"]
        if ptype == "identity" and not sd:
            return "linear", self.enc_hidden[modality], {"weight": w0.clone(), "bias": b0.clone()}
        first = "weight" if ptype == "linear" else "0.weight" if _MLP.match(ptype or "") else None
        expected = ({"weight", "bias"} if ptype == "linear" else
                    {f"{2 * i}.{n}" for i in range(int(_MLP.match(ptype).group(1)))
                     for n in ("weight", "bias")} if first else set())
        if first is None or set(sd) != expected:
            raise ValueError(f"cannot fold the input layer of {modality!r} into shared projector "
                             f"{ptype!r} with parameters {sorted(sd)} (wrapped by a method?)")
        bias_key = first.replace("weight", "bias")
        w1, b1 = sd[first].float(), sd[bias_key].float()
        sd[first] = (w1 @ w0.float()).to(sd[first].dtype)
        sd[bias_key] = (w1 @ b0.float() + b1).to(sd[bias_key].dtype)
        return ptype, self.enc_hidden[modality], sd

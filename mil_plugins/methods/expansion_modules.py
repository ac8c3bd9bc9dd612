"""The mechanism of the ``expansion`` method (:mod:`mil_plugins.methods.expansion`): a low-rank
adapter per stage on the connector (:class:`ConnectorExpansion`, its forward hooks), the input
descriptor that routes among them (:func:`choose_adapters`), and the stage keys."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

TARGETS = ("auto", "connector", "lora", "both")
TRAIN_BASE = ("first_stage", "never")
PREFIX = "connector.expansion."


def stage_key(index: int) -> str:
    return f"stage{index}"


def stage_route(stage) -> str:
    return stage.modality or "text"


class LowRankAdapter(nn.Module):
    """``x -> up(down(dropout(x))) * alpha / rank``; ``up`` starts at zero (a no-op adapter)."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scale = float(alpha) / float(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(self.dropout(x))) * self.scale


def input_descriptor(features: torch.Tensor) -> torch.Tensor:
    """``[N, D]``: each item's features (``[N, T, D]``, what the connector's input layer reads)
    mean-pooled over tokens and L2-normalised -- computed from the input alone."""
    x = features.detach().float()
    x = x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)
    return torch.nn.functional.normalize(x, dim=-1)


def choose_adapters(features: torch.Tensor, keys: list[str],
                    descriptors: dict[str, torch.Tensor]) -> list[str]:
    """Per item, the adapter among ``keys`` whose stage descriptor is nearest (cosine) to the
    item's own descriptor. Reads nothing but the features: no task label, no stage id."""
    if len(keys) == 1:
        return [keys[0]] * features.shape[0]
    known = [k for k in keys if k in descriptors]
    if not known:
        return [keys[-1]] * features.shape[0]
    table = torch.stack([descriptors[k].to(features.device).float() for k in known])  # [K, D]
    best = (input_descriptor(features) @ table.T).argmax(dim=1)
    return [known[int(i)] for i in best]


class ConnectorExpansion(nn.Module):
    """Per-stage adapters parallel to ``connector.shared``, routed per item from its input.

    :meth:`attach` registers a forward pre-hook on every ``connector.input_layers[m]`` (remembering
    ``m`` and choosing, per item, among ``m``'s stage adapters by :func:`choose_adapters` on the
    features the input layer reads) and a forward hook on ``connector.shared`` (adding each item's
    adapter output). Hooks are bound methods of this module, so a ``copy.deepcopy`` of the model
    (the engine's teacher) routes through its own copy of the adapters.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.adapters = nn.ModuleDict()
        self.routes: dict[str, list[str]] = {}       # modality -> its stages' adapter keys
        self.forced: dict[str, str] = {}             # modality -> the adapter its stage trains
        self.descriptors: dict[str, torch.Tensor] = {}  # adapter key -> stage descriptor [D]
        #: modality -> per-item adapter keys chosen by a method before the forward (``tme``);
        #: used once, by the next projection of that modality with as many items
        self.preset: dict[str, list[str]] = {}
        self.current: str | None = None   # modality being projected
        self.choice: list[str] | None = None  # per item, its adapter key

    def add(self, key: str) -> LowRankAdapter:
        adapter = LowRankAdapter(self.d_in, self.d_out, self.rank, self.alpha, self.dropout)
        self.adapters[key] = adapter
        return adapter

    def attach(self, connector: nn.Module) -> None:
        for modality, layer in connector.input_layers.items():
            layer.register_forward_pre_hook(functools.partial(self._enter, modality))
        connector.shared.register_forward_hook(self._leave)

    def keys_for(self, modality: str, features: torch.Tensor) -> list[str] | None:
        keys = [k for k in self.routes.get(modality) or [] if k in self.adapters]
        if not keys:
            return None
        if modality in self.forced:
            return [self.forced[modality]] * features.shape[0]
        preset = self.preset.pop(modality, None)
        if preset is not None and len(preset) == features.shape[0]:
            return list(preset)
        return choose_adapters(features, keys, self.descriptors)

    def _enter(self, modality: str, module: nn.Module, args: Any) -> None:
        self.current = modality
        self.choice = self.keys_for(modality, args[0])

    def _leave(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        choice = self.choice if self.current is not None else None
        used = set(choice or ())
        if choice is not None and len(choice) == output.shape[0]:
            x = args[0]
            for key in sorted(used):
                adapter = self.adapters[key]
                p = adapter.up.weight
                delta = adapter(x.to(p.dtype)).to(output.dtype)
                if len(used) > 1:
                    rows = torch.tensor([c == key for c in choice], device=output.device)
                    delta = delta * rows.view(-1, *([1] * (delta.dim() - 1))).to(delta.dtype)
                output = output + delta
        if torch.is_grad_enabled():
            # a zero term for every trainable adapter not on this path, so that DDP / ZeRO see a
            # gradient for each trainable parameter on every batch (LLaVA's dummy-term contract)
            idle = [q for k, a in self.adapters.items() if k not in used
                    for q in a.parameters() if q.requires_grad]
            if idle:
                output = output + (sum(q.sum() for q in idle) * 0.0).to(output.dtype)
        return output


def _lora_adapter_of(name: str) -> str | None:
    """The PEFT adapter a parameter belongs to (``...lora_A.<adapter>.weight``), else None."""
    if not name.startswith("llm."):
        return None
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None

"""Method modules inside the model's linear layers, routed by each token's modality.

A method asks :meth:`MultimodalLM.wrap_linears` to put a module of its own beside every targeted
``nn.Linear`` of the LLM (``scope="llm"``: attention q/k/v/o, MLP up/gate/down, chosen like PEFT's
``target_modules``) or of the shared connector (``scope="connector"``). The linear layer itself is
not replaced (its parameters keep their names, so checkpoints, PEFT LoRA and LLaVA export are
untouched): a forward hook hands its input ``x``, its output ``y`` and the :class:`Route` of the
tokens to each method module in turn, and the last module's result is the layer's output::

    y = linear(x);  for module in slot.modules.values():  y = module(x, y, route)

The token-modality map (:class:`TokenModality`) says, per token of the forward in flight, which
modality it belongs to: ``0`` = text, ``1 + i`` = ``model.modalities[i]`` (the modality whose
placeholder the token came from). :class:`~mil_plugins.model.mllm.MultimodalLM` sets it from the
``input_ids`` of every forward and generation, so training, evaluation, the teacher (a deep copy of
the model, which copies the map and its hooks with it) and DeepSpeed's wrapped forward all see it.
With the KV cache, a pre-hook on the LLM's decoder works out which positions a call covers from the
cache length: prompt positions take the prompt's map, generated tokens are text. Routing therefore
uses only what the input shows, never a stage id or task label.

In the connector every token of a call has the modality being projected (``connector(m, x)``).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn

TEXT = 0
SCOPES = ("llm", "connector")


class TokenModality:
    """The token-modality map of the forward in flight; one plain object shared by every slot."""

    def __init__(self) -> None:
        self.names: list[str] = ["text"]      # id -> name; model.add_modality appends
        self.prompt: torch.Tensor | None = None  # [B, L] of the LLM call's whole input
        self.llm: torch.Tensor | None = None     # [B, T] of the decoder call in flight
        self.connector: int | None = None        # id of the modality being projected

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown modality {name!r}; the map knows {self.names}") from None

    def ids(self, scope: str, x: torch.Tensor) -> torch.Tensor:
        """``[*x.shape[:-1]]`` long tensor of modality ids for the tokens ``x`` holds."""
        shape = x.shape[:-1]
        if scope == "connector":
            value = TEXT if self.connector is None else self.connector
            return torch.full(shape, value, dtype=torch.long, device=x.device)
        cur = self.llm
        if cur is None:  # a call outside MultimodalLM.forward/generate: nothing spliced, all text
            return torch.zeros(shape, dtype=torch.long, device=x.device)
        if tuple(cur.shape) != tuple(shape):
            raise RuntimeError(f"token-modality map has shape {tuple(cur.shape)} but the layer sees "
                               f"tokens of shape {tuple(shape)}")
        return cur.to(x.device)

    # ---- hooks --------------------------------------------------------------------------------
    def on_decoder_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the LLM's decoder: the map of the positions this call covers."""
        if self.prompt is None:
            self.llm = None
            return
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values")
        has_length = past is not None and hasattr(past, "get_seq_length")
        n_past = int(past.get_seq_length()) if has_length else 0
        batch, length = int(x.shape[0]), int(x.shape[1])
        prompt = self.prompt.to(x.device)
        if prompt.shape[0] != batch:  # beam search / num_return_sequences expand the batch
            if batch % prompt.shape[0]:
                raise RuntimeError(f"token-modality map is for {prompt.shape[0]} rows, the call "
                                   f"has {batch}")
            prompt = prompt.repeat_interleave(batch // prompt.shape[0], dim=0)
        pos = torch.arange(n_past, n_past + length, device=x.device)
        ids = torch.zeros(batch, length, dtype=torch.long, device=x.device)  # generated: text
        inside = pos < prompt.shape[1]
        ids[:, inside] = prompt[:, pos[inside]]
        self.llm = ids

    def on_connector_call(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the connector: ``connector(modality, features)``."""
        self.connector = self.index(args[0])


class Route:
    """What a method module sees about the tokens of one call: their modality ids and names."""

    def __init__(self, ids: torch.Tensor, names: list[str]):
        self.ids, self.names = ids, names

    def mask(self, name: str) -> torch.Tensor:
        """Bool ``[*tokens]``: the tokens of modality ``name`` (``"text"`` for text)."""
        if name not in self.names:
            return torch.zeros_like(self.ids, dtype=torch.bool)
        return self.ids == self.names.index(name)

    def present(self) -> list[str]:
        """Names of the modalities with at least one token in this call (text included)."""
        return [self.names[i] for i in torch.unique(self.ids).tolist()]


class LinearSlot(nn.Module):
    """The method modules beside one linear layer (``modules[owner]``), run by a forward hook."""

    def __init__(self, routing: TokenModality, scope: str, path: str, d_in: int, d_out: int):
        super().__init__()
        self.routing, self.scope, self.path = routing, scope, path
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.modules_by_owner = nn.ModuleDict()

    def hook(self, linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not len(self.modules_by_owner):
            return output
        x = args[0]
        route = Route(self.routing.ids(self.scope, x), self.routing.names)
        y = output
        for module in self.modules_by_owner.values():
            y = module(x, y, route)
        return y


def slot_key(scope: str, path: str) -> str:
    """ModuleDict key of a slot (no dots allowed): ``llm-model-layers-0-self_attn-q_proj``."""
    return f"{scope}-{path}".replace(".", "-")


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    if isinstance(targets, str):  # like PEFT: a string is a regex matched against the full name
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_linears(root: nn.Module, targets: str | Iterable[str]) -> list[tuple[str, nn.Linear]]:
    """``(name, linear)`` of every ``nn.Linear`` under ``root`` whose name matches ``targets``
    (a list of names/suffixes such as ``["q_proj", "v_proj"]``, or a regex string). PEFT's LoRA
    internals are skipped and a LoRA-wrapped layer is found by its own name (its ``base_layer``)."""
    out = []
    for name, module in root.named_modules():
        if not isinstance(module, nn.Linear) or "lora_" in name:
            continue
        plain = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
        if _matches(plain, targets):
            out.append((plain, module))
    return out


def wrap_linears(slots: nn.ModuleDict, routing: TokenModality, scope: str, root: nn.Module,
                 owner: str, targets: str | Iterable[str],
                 make: Callable[[str, nn.Linear], nn.Module]) -> dict[str, nn.Module]:
    """Give every targeted linear under ``root`` the module ``make(name, linear)`` of ``owner``.

    The first module for a layer creates its :class:`LinearSlot` (in ``slots``) and its hook;
    several owners (methods) may wrap the same layer and run in the order they wrapped it.
    Returns ``{layer name: module}``; raises ``ValueError`` when nothing matches.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    found = find_linears(root, targets)
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in root.named_modules()
                        if isinstance(m, nn.Linear) and "lora_" not in n})
        raise ValueError(f"{owner}: no {scope} linear layer matches {targets!r} "
                         f"(linear layers there: {names})")
    out = {}
    for name, linear in found:
        key = slot_key(scope, name)
        slot = slots[key] if key in slots else None
        if slot is None:
            slot = LinearSlot(routing, scope, name, linear.in_features, linear.out_features)
            slots[key] = slot
            linear.register_forward_hook(slot.hook)
        if owner in slot.modules_by_owner:
            raise ValueError(f"{owner} already wraps {scope} layer {name!r}")
        module = make(name, linear)
        ref = linear.weight
        module.to(device=ref.device, dtype=ref.dtype)
        slot.modules_by_owner[owner] = module
        out[name] = module
    return out


def decoder_of(llm: nn.Module) -> nn.Module:
    """The module that runs the LLM's transformer layers (called with ``past_key_values``)."""
    get = getattr(llm, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None:
        decoder = getattr(llm, "model", None)
    if not isinstance(decoder, nn.Module):
        raise TypeError(f"cannot find the decoder of {type(llm).__name__} to route tokens")
    return decoder


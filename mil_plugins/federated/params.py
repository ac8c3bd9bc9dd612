"""Named tensors in and out of a model: what a client sends, what the server keeps.

Only tensors cross the wire (``{name: tensor}``, the model's own parameter and buffer names).
The connector's fitted feature standardisers (``*.standardizers.<m>.mean`` / ``.inv_std``)
travel with the parameters: each client fits its modalities' on its own data in its first
round, the server averages them like parameters, and a model that receives them counts as fitted.
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]
STANDARDIZER = ".standardizers."


def is_text(name: str) -> bool:
    """Text-side parameters: the LLM and its LoRA (what Pilot's adaptive aggregation weighs)."""
    return name.startswith("llm.")


def standardizer_names(model, modalities) -> set[str]:
    out = set()
    for name, _ in model.named_buffers():
        if STANDARDIZER in name and name.endswith((".mean", ".inv_std")):
            if any(f"{STANDARDIZER}{m}." in name for m in modalities):
                out.add(name)
    return out


def _tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def snapshot(model, names) -> State:
    """CPU copies of the named parameters / buffers of ``model``."""
    tensors = _tensors(model)
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise KeyError(f"not parameters or buffers of the model: {missing[:5]}")
    return {n: tensors[n].detach().cpu().clone() for n in sorted(names)}


@torch.no_grad()
def load_into(model, state: State) -> None:
    """Copy ``state`` into ``model`` by name; a received standardiser ``mean`` marks it fitted
    (unless ``state`` carries the ``fitted`` flag itself)."""
    tensors = _tensors(model)
    unknown = sorted(set(state) - set(tensors))
    if unknown:
        raise KeyError(f"received tensors the model does not have: {unknown[:5]} "
                       f"(do the server and the client run the same recipe?)")
    for name, value in state.items():
        target = tensors[name]
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"received {name!r} with shape {tuple(value.shape)}, the model's is "
                             f"{tuple(target.shape)}")
        target.copy_(value.to(device=target.device, dtype=target.dtype))
        if STANDARDIZER in name and name.endswith(".mean"):
            flag = name[: -len("mean")] + "fitted"
            if flag in tensors and flag not in state:
                tensors[flag].fill_(True)

"""Projector checkpoints in LLaVA's and transformers' layouts, both ways.

Our projector state dict is the bare module's (``0.weight``, ``0.bias``, ``2.weight``, ... for
``mlp2x_gelu``; ``weight``, ``bias`` for ``linear``). LLaVA saves it in ``mm_projector.bin`` under
``model.mm_projector.*``; transformers' ``LlavaForConditionalGeneration`` holds the ``mlp2x_gelu``
projector as ``multi_modal_projector.linear_1.*`` / ``linear_2.*``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LLAVA_PREFIX = "model.mm_projector."
HF_PREFIX = "multi_modal_projector."
_HF_NAMES = {"0": "linear_1", "2": "linear_2"}


def to_llava(state: dict[str, torch.Tensor], prefix: str = LLAVA_PREFIX) -> dict[str, torch.Tensor]:
    """Our projector state dict -> LLaVA's ``mm_projector.bin`` keys."""
    return {prefix + k: v for k, v in state.items()}


def from_llava(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaVA keys (``model.mm_projector.*``, ``mm_projector.*``, or any ``...mm_projector.``) -> ours.

    Mirrors LLaVA's own ``get_w(weights, 'mm_projector')``: everything after ``mm_projector.``.
    """
    out = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    if not out:
        raise KeyError(f"no 'mm_projector.' keys in this state dict (keys: {sorted(state)[:8]} ...)")
    return out


def to_hf_llava(state: dict[str, torch.Tensor], projector_type: str = "mlp2x_gelu",
                prefix: str = HF_PREFIX) -> dict[str, torch.Tensor]:
    """Our ``mlp2x_gelu`` state dict -> ``multi_modal_projector.linear_{1,2}.*``."""
    if projector_type != "mlp2x_gelu":
        raise ValueError(f"transformers' LlavaMultiModalProjector is Linear-GELU-Linear "
                         f"(mlp2x_gelu); a {projector_type!r} projector has no equivalent there")
    out = {}
    for key, value in state.items():
        index, rest = key.split(".", 1)
        if index not in _HF_NAMES:
            raise KeyError(f"unexpected mlp2x_gelu key {key!r}")
        out[f"{prefix}{_HF_NAMES[index]}.{rest}"] = value
    return out


def from_hf_llava(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``[model.]multi_modal_projector.linear_{1,2}.*`` -> our ``mlp2x_gelu`` keys."""
    back = {v: k for k, v in _HF_NAMES.items()}
    out = {}
    for key, value in state.items():
        if HF_PREFIX not in key:
            continue
        rest = key.split(HF_PREFIX, 1)[1]
        layer, param = rest.split(".", 1)
        if layer not in back:
            raise KeyError(f"unexpected projector key {key!r}")
        out[f"{back[layer]}.{param}"] = value
    if not out:
        raise KeyError(f"no '{HF_PREFIX}' keys in this state dict")
    return out


def save_llava_projector(directory: str | Path, state: dict[str, torch.Tensor], *,
                         projector_type: str, mm_hidden_size: int, hidden_size: int,
                         extra_config: dict[str, Any] | None = None,
                         safetensors: bool = True) -> Path:
    """Write ``mm_projector.bin`` (LLaVA keys; plain tensors, loadable with weights_only=True),
    ``mm_projector.safetensors`` (same keys) and a ``config.json`` with LLaVA's ``mm_*`` keys."""
    from mil_plugins.atomic import atomic_write_bytes, atomic_write_json, atomic_save_safetensors
    import io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    llava_state = {k: v.detach().cpu().contiguous() for k, v in to_llava(state).items()}
    buffer = io.BytesIO()
    torch.save(llava_state, buffer)
    atomic_write_bytes(directory / "mm_projector.bin", buffer.getvalue())
    if safetensors:
        atomic_save_safetensors(directory / "mm_projector.safetensors", llava_state)
    config = {"mm_projector_type": projector_type, "mm_hidden_size": int(mm_hidden_size),
              "hidden_size": int(hidden_size), "tune_mm_mlp_adapter": True,
              **(extra_config or {})}
    atomic_write_json(directory / "config.json", config)
    return directory / "mm_projector.bin"


def load_projector_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a projector checkpoint (``.bin``/``.pt`` with weights_only, or ``.safetensors``) in any
    of the three layouts and return our state dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        raw = load_file(str(path))
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    if any(HF_PREFIX in k for k in raw):
        return from_hf_llava(raw)
    if any("mm_projector." in k for k in raw):
        return from_llava(raw)
    return dict(raw)


def load_llava_config(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text())

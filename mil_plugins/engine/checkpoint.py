"""Checkpoints: one directory per finished stage, plus a rolling mid-stage one; all atomic.

    OUT/checkpoints/stage-01-image/      after stage 1 (also what `mil eval` / `mil export` read)
        weights.safetensors              parameters trained so far and modules methods added
        methods.json / methods.safetensors   each method's state (tensors split out)
        state.json                       progress: completed stages, accuracy matrix so far, timings
        recipe.json                      the resolved recipe the run was started with
        tokenizer/                       the tokenizer (built from data for tiny models)
    OUT/checkpoints/last/                the newest checkpoint, stage-end or mid-stage
        ...same, plus optimizer.pt (torch.save of plain tensors, loaded with weights_only=True)

The base weights (a pretrained LLM, frozen encoders) are not copied: they are rebuilt from the
recipe with the same seed, and only what changed is loaded on top.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mil_plugins.atomic import atomic_dir, atomic_save_safetensors, atomic_write_json, recover_dir


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Replace tensors in a nested JSON-like structure by {"__tensor__": key}, collecting them."""
    if isinstance(obj, torch.Tensor):
        key = prefix or f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, tensors, f"{prefix}.{k}" if prefix else str(k))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def write_checkpoint(path: Path, *, weights: dict[str, torch.Tensor], methods: dict[str, Any],
                     state: dict, recipe: dict, tokenizer, optimizer_state: dict | None = None) -> Path:
    with atomic_dir(path) as tmp:
        atomic_save_safetensors(tmp / "weights.safetensors",
                                {k: v.detach().cpu() for k, v in weights.items()})
        tensors: dict[str, torch.Tensor] = {}
        atomic_write_json(tmp / "methods.json", split_tensors(methods, tensors))
        atomic_save_safetensors(tmp / "methods.safetensors", tensors)
        atomic_write_json(tmp / "state.json", state)
        atomic_write_json(tmp / "recipe.json", {k: v for k, v in recipe.items()})
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if optimizer_state is not None:
            buffer = io.BytesIO()
            torch.save(optimizer_state, buffer)
            (tmp / "optimizer.pt").write_bytes(buffer.getvalue())
    return path


def read_checkpoint(path: Path) -> dict:
    """Everything in a checkpoint directory, safely (safetensors, JSON, weights_only)."""
    recover_dir(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a mil-plugins checkpoint (no state.json)")
    tensors = load_file(str(path / "methods.safetensors"))
    out = {
        "weights": load_file(str(path / "weights.safetensors")),
        "methods": join_tensors(json.loads((path / "methods.json").read_text()), tensors),
        "state": json.loads((path / "state.json").read_text()),
        "recipe": json.loads((path / "recipe.json").read_text()),
        "tokenizer_dir": path / "tokenizer",
        "optimizer": None,
    }
    if (path / "optimizer.pt").exists():
        out["optimizer"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    return out


def stage_dir(root: Path, index: int, name: str) -> Path:
    return root / f"stage-{index + 1:02d}-{name}"


def update_last(root: Path, source: Path) -> None:
    """Point ``last`` at a finished stage checkpoint (a copy, swapped in atomically)."""
    with atomic_dir(root / "last") as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(source, tmp)

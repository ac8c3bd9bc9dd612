"""Checkpoints: one directory per finished stage, plus a rolling mid-stage one; all atomic.

    OUT/checkpoints/stage-01-image/      after stage 1 (also what `mil eval` / `mil export` read)
        weights.safetensors              parameters trained so far and modules methods added
        methods.json / methods.safetensors   each method's state (tensors split out)
        state.json                       progress: completed stages, accuracy matrix so far, timings
        recipe.json                      the resolved recipe the run was started with
        tokenizer/                       the tokenizer (built from data for tiny models)
        data.json                        sha256 of every manifest the run reads (resume compares)
        checksums.json                   sha256 of every file above, written last; verified on load
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
from mil_plugins.checksums import ChecksumError, verify_checksums, write_checksums


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, edited or inconsistent; the message names the file."""


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
                     state: dict, recipe: dict, tokenizer, optimizer_state: dict | None = None,
                     data: dict | None = None) -> Path:
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
        if data is not None:
            atomic_write_json(tmp / "data.json", data)
        write_checksums(tmp)  # last: a complete manifest means a complete checkpoint
    return path


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError: a truncated or corrupt file
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                              ) from None


def _optimizer(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (a pickle with code in it), a truncated zip, ...
        # torch's message suggests weights_only=False, i.e. running the file's code: never
        raise CheckpointError(f"{path}: not a plain-tensor optimizer state torch can load safely "
                              f"({type(exc).__name__}); the file is corrupt or was replaced"
                              ) from None


def check_state(path: Path, state: Any, num_stages: int | None = None) -> None:
    """``state.json`` makes sense: counters in range, matrices of the right shape."""
    def bad(problem: str):
        raise CheckpointError(f"{path / 'state.json'}: {problem}")

    if not isinstance(state, dict):
        bad("not a JSON object")
    stages = state.get("stages")
    if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
        bad("'stages' must be a list of stage names")
    n = len(stages)
    if num_stages is not None and n != num_stages:
        bad(f"records {n} stage(s), the recipe has {num_stages}")
    completed = state.get("completed")
    if isinstance(completed, bool) or not isinstance(completed, int) or not 0 <= completed <= n:
        bad(f"'completed' is {completed!r}; expected an integer from 0 to {n}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        bad(f"'step' is {step!r}; expected an integer >= 0")
    in_stage = state.get("in_stage")
    if in_stage is not None and not isinstance(in_stage, str):
        bad(f"'in_stage' is {in_stage!r}; expected a stage name or null")
    if in_stage is not None and in_stage != "warmup" and in_stage not in stages:
        bad(f"'in_stage' {in_stage!r} is not a stage of this run ({', '.join(stages)})")
    if in_stage is not None and in_stage != "warmup" and stages.index(in_stage) != completed:
        bad(f"'in_stage' {in_stage!r} is not the stage after the {completed} completed one(s)")
    matrix = state.get("accuracy_matrix")
    if not isinstance(matrix, list) or len(matrix) != n or not all(
            isinstance(row, list) and len(row) == n for row in matrix):
        bad(f"'accuracy_matrix' must be {n} rows of {n} values")
    for key in ("trainable_parameters", "seconds"):
        if not isinstance(state.get(key), list) or len(state[key]) != n:
            bad(f"'{key}' must be a list of {n} values")
    if not isinstance(state.get("warmup_done"), bool):
        bad("'warmup_done' must be true or false")
    if not isinstance(state.get("ever_trained", []), list):
        bad("'ever_trained' must be a list of parameter names")


def read_checkpoint(path: Path) -> dict:
    """Everything in a checkpoint directory, safely (safetensors, JSON, weights_only).

    Every problem (a missing, truncated, corrupt or edited file) is a :class:`CheckpointError`
    whose one-line message names the file. ``checksums.json`` is verified first when present.
    """
    path = Path(path)
    recover_dir(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a mil-plugins checkpoint (no state.json)")
    try:
        verify_checksums(path)
    except ChecksumError as exc:
        raise CheckpointError(str(exc)) from None
    tensors = _safetensors(path / "methods.safetensors")
    methods = _json(path / "methods.json")
    try:
        methods = join_tensors(methods, tensors)
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path / 'methods.json'}: refers to a tensor "
                              f"methods.safetensors does not hold ({exc})") from None
    recipe = _json(path / "recipe.json")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list):
        raise CheckpointError(f"{path / 'recipe.json'}: not a resolved recipe")
    state = _json(path / "state.json")
    check_state(path, state, len(recipe["stages"]))
    if not (path / "tokenizer").is_dir():
        raise CheckpointError(f"{path / 'tokenizer'}: missing")
    out = {
        "weights": _safetensors(path / "weights.safetensors"),
        "methods": methods,
        "state": state,
        "recipe": recipe,
        "tokenizer_dir": path / "tokenizer",
        "data": _json(path / "data.json") if (path / "data.json").exists() else None,
        "optimizer": None,
    }
    if (path / "optimizer.pt").exists():
        out["optimizer"] = _optimizer(path / "optimizer.pt")
    return out


def stage_dir(root: Path, index: int, name: str) -> Path:
    return root / f"stage-{index + 1:02d}-{name}"


def update_last(root: Path, source: Path) -> None:
    """Point ``last`` at a finished stage checkpoint (a copy, swapped in atomically)."""
    with atomic_dir(root / "last") as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(source, tmp)

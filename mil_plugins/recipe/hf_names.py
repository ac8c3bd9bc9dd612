"""Hugging Face ``TrainingArguments`` names in a recipe, accepted beside ours.

Where HF's name differs from ours, the HF name is an alias: each recipe file (before ``extends``
merging) and each ``key=value`` override is rewritten to our key, so the rest of the toolkit sees
one name. Giving both names of one setting in the same file is an error. Where we had no such
setting, the schema key *is* HF's name (``per_device_train_batch_size``, ``warmup_steps``,
``lr_scheduler_kwargs``, ``gradient_checkpointing``, ``dataloader_num_workers``, ``report_to``).
``docs/recipes.md`` lists every pair (a test checks it).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from typing import Any

__all__ = ["ALIASES", "HF_SAME_NAME", "canonical_names", "canonical_key", "normalize_report_to"]

#: HF name (as a key path) -> our key path
ALIASES: dict[tuple[str, str], tuple[str, str]] = {
    ("train", "gradient_accumulation_steps"): ("train", "grad_accum"),
    ("train", "lr_scheduler_type"): ("train", "scheduler"),
    ("train", "learning_rate"): ("train", "lr"),
    ("train", "num_train_epochs"): ("train", "epochs"),
    ("train", "logging_steps"): ("train", "log_every_steps"),
    ("train", "save_steps"): ("train", "save_every_steps"),
    ("train", "report_to"): ("output", "report_to"),   # HF keeps it with the training arguments
}

#: our keys that already carry HF's name (and meaning)
HF_SAME_NAME: tuple[tuple[str, str], ...] = (
    ("train", "per_device_train_batch_size"), ("train", "warmup_ratio"), ("train", "warmup_steps"),
    ("train", "lr_scheduler_kwargs"), ("train", "weight_decay"), ("train", "max_grad_norm"),
    ("train", "max_steps"), ("train", "seed"), ("train", "data_seed"), ("train", "deepspeed"),
    ("train", "gradient_checkpointing"), ("train", "dataloader_num_workers"),
    ("output", "report_to"),
)


def canonical_key(key: str) -> str:
    """``train.gradient_accumulation_steps`` -> ``train.grad_accum`` (other keys unchanged)."""
    parts = key.split(".")
    target = ALIASES.get(tuple(parts[:2]))
    return ".".join(target + tuple(parts[2:])) if target and len(parts) >= 2 else key


def canonical_names(data: dict, source: Any) -> dict:
    """``data`` (one recipe file) with every HF alias moved to our key."""
    from mil_plugins.recipe.errors import RecipeError

    out = copy.deepcopy(data)
    for (section, name), (to_section, to_name) in ALIASES.items():
        node = out.get(section)
        if not isinstance(node, dict) or name not in node:
            continue
        value = node.pop(name)
        target = out.setdefault(to_section, {})
        if not isinstance(target, dict):
            raise RecipeError(source, to_section, "expected a mapping")
        if to_name in target:
            raise RecipeError(source, f"{section}.{name}",
                              f"{section}.{name} is HF's name for {to_section}.{to_name}, which is "
                              f"also given: keep one of them")
        target[to_name] = value
    return out


def normalize_report_to(value: Any, source: Any, key: str = "output.report_to") -> Any:
    """HF's forms: a string, ``"none"`` (nothing), ``"all"`` (every installed integration), or a
    list; returns a list (or ``None`` unchanged). Unknown names and an uninstalled ``wandb`` are
    errors."""
    from mil_plugins.recipe import schema as S
    from mil_plugins.recipe.errors import RecipeError

    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RecipeError(source, key, f"expected a name or a list of names, got {value!r}")
    if names in (["none"], ["None"]):
        return []
    if names == ["all"]:
        return [n for n in S.REPORT_TO if n == "tensorboard" or _installed(n)]
    for name in names:
        if name not in S.REPORT_TO:
            raise RecipeError(source, key, f"{name!r} is not one of {', '.join(S.REPORT_TO)}, "
                                           f"none, all")
        if name != "tensorboard" and not _installed(name):
            raise RecipeError(source, key, f"report_to {name!r}: the {name} package is not "
                                           f"installed (pip install {name})")
    return list(dict.fromkeys(names))


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None

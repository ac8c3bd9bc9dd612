"""Trainable groups -> parameter names, and applying them (``requires_grad``).

Groups a recipe may name (per stage, or ``train.trainable`` as the default):

    llm         every LLM weight except LoRA weights (full fine-tuning)
    lora        LoRA weights of the LLM (model.lora must be set)
    embeddings  the LLM's input embeddings and LM head only
    connector   the shared connector, plus the current modality's input layer / projector
    encoder     the current modality's encoder

Methods then adjust the set through their ``trainable`` hook (e.g. adding their adapters).
"""

from __future__ import annotations

from typing import Iterable

from torch import nn


def _current(name: str, prefix: str, modality: str | None) -> bool:
    return modality is not None and name.startswith(f"{prefix}.{modality}.")


def group_names(model: nn.Module, groups: Iterable[str], modality: str | None) -> set[str]:
    names: set[str] = set()
    groups = set(groups)
    for name, _ in model.named_parameters():
        is_llm = name.startswith("llm.")
        is_lora = is_llm and "lora_" in name
        if "llm" in groups and is_llm and not is_lora:
            names.add(name)
        if "lora" in groups and is_lora:
            names.add(name)
        if "embeddings" in groups and is_llm and ("embed_tokens" in name or "lm_head" in name):
            names.add(name)
        if "connector" in groups and (
                name.startswith("connector.shared.")
                or _current(name, "connector.input_layers", modality)
                or _current(name, "connector.projectors", modality)):
            names.add(name)
        if "encoder" in groups and _current(name, "encoders", modality):
            names.add(name)
    return names


def apply_trainable(model: nn.Module, names: set[str]) -> int:
    """Set ``requires_grad`` from ``names``; returns the number of trainable parameters."""
    count = 0
    known = set()
    for name, param in model.named_parameters():
        known.add(name)
        param.requires_grad_(name in names)
        if name in names:
            count += param.numel()
    unknown = names - known
    if unknown:
        raise KeyError(f"trainable names that are not parameters of the model: {sorted(unknown)[:5]}")
    return count

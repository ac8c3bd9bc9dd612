"""The multimodal model: connector, feature splicing, the LLaVA-style LM, build, save/load.

    connector.py  Connector: per-modality projectors or per-modality input layers + one shared projector
    splice.py     splice_features: projected features -> the placeholder positions of the embeddings
    mllm.py       MultimodalLM: encoders + connector + HF causal LM (forward, generate)
    build.py      build_model(cfg, tokenizer), build_tiny_llm_config(...)
    io.py         save_model / load_model (safetensors + PEFT adapter, atomic)
    hf_llava.py   HFVisionTowerEncoder / LlavaVisionPlugin: an HF vision tower as the image modality

Whole-model conversion to and from transformers' LlavaForConditionalGeneration is a format of
another project, one floor up: ``mil_plugins.integrations.hf_llava`` (from_hf_llava, to_hf_llava).

Heavy modules import lazily; ``from mil_plugins.model import build_model`` etc. work.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Connector": "connector",
    "splice_features": "splice",
    "placeholder_mask": "splice",
    "PlaceholderMismatchError": "splice",
    "MultimodalLM": "mllm",
    "build_model": "build",
    "build_tiny_llm_config": "build",
    "save_model": "io",
    "load_model": "io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Save and load a :class:`~mil_plugins.model.mllm.MultimodalLM` -- never unpickling.

Layout of a saved model directory::

    mil_model.json            format version, modalities (plugin, options, placeholder id, tokens),
                              connector config, how the LLM was built, LoRA config, dtype
    tokenizer/                tokenizer.save_pretrained (placeholder tokens included)
    llm/                      the base LLM, HF format (config.json + model.safetensors); LoRA
                              weights are NOT merged in
    adapter/                  only with LoRA: the adapter in PEFT's own format
                              (adapter_config.json + adapter_model.safetensors)
    encoders.safetensors      encoders' state, keys "<modality>.<param>"
    connector.safetensors     connector's state, keys as in the model minus "connector."

The directory is written under a temporary sibling name and swapped in at the end
(:func:`mil_plugins.atomic.atomic_dir`), so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mil_plugins.modality import ModalityPlugin
from mil_plugins.model.build import resolve_dtype
from mil_plugins.model.connector import Connector
from mil_plugins.model.mllm import MultimodalLM

FORMAT_VERSION = 1
META_FILE = "mil_model.json"


def _class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _clean_base_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """The base LLM's state dict without LoRA weights and with PEFT's ``base_layer`` renamed away."""
    base = model.base_llm()
    out = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or ".lora_" in key or "modules_to_save" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def model_meta(model: MultimodalLM) -> dict[str, Any]:
    """What ``mil_model.json`` holds."""
    info = dict(model.build_info or {})
    llm_src = info.get("llm")
    if llm_src is None:
        llm_src = {"config": model.base_llm().config.to_dict()}
    dtype = info.get("dtype") or str(model.llm.get_input_embeddings().weight.dtype).replace("torch.", "")
    lora = info.get("lora")
    if model.is_peft and not lora:
        lora = {"peft": True}
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "llm": llm_src,
        "lora": lora,
        "peft": model.is_peft,
        "connector": model.connector.config(),
        "modalities": [
            {"name": m, "plugin": _class_path(p), "options": p.options,
             "placeholder": p.placeholder, "placeholder_id": model.placeholder_ids[m],
             "num_tokens": model.num_tokens[m]}
            for m, p in model.plugins.items()],
    }


def save_model(model: MultimodalLM, directory: str | os.PathLike) -> Path:
    """Write ``model`` to ``directory`` (replaced atomically if it exists). Returns the path."""
    from mil_plugins.atomic import atomic_dir, atomic_save_safetensors, atomic_write_json
    from mil_plugins.checksums import write_checksums

    directory = Path(directory)
    meta = model_meta(model)
    with atomic_dir(directory) as tmp:
        atomic_write_json(tmp / META_FILE, meta)
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        base = model.base_llm()
        base.save_pretrained(str(tmp / "llm"), state_dict=_clean_base_state(model))
        if model.is_peft:
            model.llm.save_pretrained(str(tmp / "adapter"), save_embedding_layers=False)
        atomic_save_safetensors(tmp / "encoders.safetensors", model.encoders.state_dict(),
                                metadata={"format_version": FORMAT_VERSION})
        atomic_save_safetensors(tmp / "connector.safetensors", model.connector.state_dict(),
                                metadata={"format_version": FORMAT_VERSION})
        write_checksums(tmp)  # last
    return directory


#: plugin classes that are not registered modalities but ship with the toolkit (an adopted HF
#: Llava's image tower); the only class paths a saved model may name directly
_INTERNAL_PLUGINS = frozenset({"mil_plugins.model.hf_llava:LlavaVisionPlugin"})


def _resolve_plugin(entry: dict[str, Any]) -> type[ModalityPlugin]:
    """The registry's plugin of the recorded name: nothing named in a saved file is imported.

    The recorded class path is only compared, so a plugin that moved is reported, not guessed."""
    from mil_plugins.plugins import MODALITIES

    name = entry.get("name")
    if not isinstance(name, str):
        raise ValueError(f"{META_FILE}: a modality entry has no name: {entry!r}")
    if entry.get("plugin") in _INTERNAL_PLUGINS:  # a fixed list of our own, never a free import
        module, _, attr = entry["plugin"].partition(":")
        import importlib
        return getattr(importlib.import_module(module), attr)
    cls = MODALITIES.get(name)
    recorded = entry.get("plugin")
    if recorded and recorded != _class_path(cls):
        import warnings

        warnings.warn(f"modality {name!r} was saved with plugin {recorded}, the registry now "
                      f"provides {_class_path(cls)}; using the registry's", stacklevel=3)
    return cls


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # truncated / corrupt / missing
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None


def load_model(directory: str | os.PathLike, device: str | torch.device | None = None,
               is_trainable: bool = True) -> MultimodalLM:
    """Load a model written by :func:`save_model`.

    Modality plugins are rebuilt through the registry by their recorded name (a recorded class
    path is never imported); ``checksums.json`` is verified first; ``is_trainable`` is passed to ``PeftModel.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory}: not a saved model (no {META_FILE})")
    from mil_plugins.checksums import verify_checksums

    verify_checksums(directory)  # a ChecksumError names the file that does not match
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{meta_path}: not a JSON model description ({exc})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {version!r}, this version reads {FORMAT_VERSION}")
    dtype = resolve_dtype(meta.get("dtype"))
    tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
    llm = AutoModelForCausalLM.from_pretrained(str(directory / "llm"), dtype=dtype)
    if meta.get("peft"):
        from peft import PeftModel

        llm = PeftModel.from_pretrained(llm, str(directory / "adapter"), is_trainable=is_trainable)
    connector = Connector.from_config(meta["connector"]).to(dtype)
    model = MultimodalLM(llm, tokenizer, connector)
    for entry in meta["modalities"]:
        plugin = _resolve_plugin(entry)(**entry.get("options", {}))
        model.add_modality(plugin)
        if model.placeholder_ids[entry["name"]] != entry["placeholder_id"]:
            raise ValueError(f"{directory}: placeholder {entry['placeholder']!r} has id "
                             f"{model.placeholder_ids[entry['name']]} in the saved tokenizer, "
                             f"{entry['placeholder_id']} when saved")
        if model.num_tokens[entry["name"]] != entry["num_tokens"]:
            raise ValueError(f"{directory}: modality {entry['name']!r} encoder gives "
                             f"{model.num_tokens[entry['name']]} tokens, saved with {entry['num_tokens']}")
    _load_into(model.encoders, _load_safetensors(directory / "encoders.safetensors"), "encoders")
    _load_into(model.connector, _load_safetensors(directory / "connector.safetensors"), "connector")
    model.build_info = {"llm": meta.get("llm"), "lora": meta.get("lora"), "dtype": meta.get("dtype")}
    if device is not None:
        model.to(device)
    return model


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{what}.safetensors does not fit the rebuilt model: missing {missing}, "
                         f"unexpected {unexpected} (a method wrapped a module before saving? "
                         f"wrap it the same way before loading the state)")

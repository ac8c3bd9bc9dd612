"""``mil export CHECKPOINT --to llava|hf OUT``: hand a trained stage to the LLaVA ecosystem.

``--to llava``: per modality, ``OUT/<modality>/mm_projector.bin`` (+ ``.safetensors``) with
LLaVA's keys (``model.mm_projector.0.weight`` ...) and a ``config.json`` with LLaVA's ``mm_*`` keys.
With a shared connector, the modality's input layer is folded exactly into the projector's first
linear layer, so the exported projector maps the encoder's features straight to the LLM width.

``--to hf``: ``OUT/`` is a directory that ``LlavaForConditionalGeneration.from_pretrained`` loads
(image tower + image projector + LLM, LoRA merged); every other modality's encoder and projector is
written beside it under ``OUT/modalities/<modality>/`` (safetensors + LLaVA projector files).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mil_plugins.atomic import atomic_save_safetensors, atomic_write_json
from mil_plugins.projectors.convert import save_llava_projector


def _check_exact(model, modality: str, ptype: str, state: dict) -> None:
    """The exported projector must reproduce the connector's output for this modality."""
    from mil_plugins.projectors import build_projector

    enc_hidden = model.connector.enc_hidden[modality]
    hidden = model.llm.get_input_embeddings().weight.shape[1]
    proj = build_projector(ptype, enc_hidden, hidden)
    proj.load_state_dict(state)
    proj.to(dtype=next(model.connector.parameters()).dtype)
    x = torch.randn(2, 3, enc_hidden, dtype=next(model.connector.parameters()).dtype)
    with torch.no_grad():
        ours = model.connector(modality, x)
        theirs = proj(x)
    if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        raise ValueError(f"the {modality!r} connector is not a plain LLaVA projector (a method "
                         f"wrapped it with adapters or gates); its LLaVA export would not be exact")


def export_llava(model, out: Path) -> list[Path]:
    written = []
    for modality in model.connector.modalities:
        written.extend(export_llava_one(model, modality, out / modality))
    return written


def export_hf(model, out: Path) -> list[Path]:
    from mil_plugins.model.hf_llava import to_hf_llava

    inside = sorted(k for k in getattr(model, "layer_modules", {}) if k.startswith("llm-"))
    if inside:
        raise ValueError(f"a method put modules inside the LLM's layers ({inside[0]}, ...); "
                         f"LlavaForConditionalGeneration has no place for them, so an HF export "
                         f"would not be exact")
    llava = to_hf_llava(model)
    out.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(str(out), safe_serialization=True)
    model.tokenizer.save_pretrained(str(out))
    written = [out / "config.json"]
    for modality in model.connector.modalities:
        if modality == "image":
            continue
        target = out / "modalities" / modality
        atomic_save_safetensors(target / "encoder.safetensors", model.encoders[modality].state_dict())
        atomic_write_json(target / "plugin.json", model.plugins[modality].config())
        written.extend(export_llava_one(model, modality, target))
    return written


def export_llava_one(model, modality: str, out: Path) -> list[Path]:
    hidden = model.llm.get_input_embeddings().weight.shape[1]
    ptype, mm_hidden, state = model.connector.llava_projector_state(
        modality, fold_input_layer=model.connector.mode == "shared")
    _check_exact(model, modality, ptype, state)
    plugin = model.plugins[modality]
    extra = {"mm_modality": modality, "mm_placeholder": plugin.placeholder,
             "mm_num_tokens": model.num_tokens[modality], "mm_encoder": plugin.config()}
    return [save_llava_projector(out, state, projector_type=ptype, mm_hidden_size=mm_hidden,
                                 hidden_size=hidden, extra_config=extra)]


def export_checkpoint(checkpoint: Path, to: str, out: Path) -> list[Path]:
    from mil_plugins.engine.session import load_for_eval

    session = load_for_eval(checkpoint)
    if to == "llava":
        return export_llava(session.model, out)
    if to == "hf":
        return export_hf(session.model, out)
    raise ValueError(f"unknown export target {to!r}; choose llava or hf")

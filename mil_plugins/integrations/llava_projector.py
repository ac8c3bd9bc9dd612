"""LLaVA's projector files, a format of another project: ``mm_projector.bin`` (+ ``.safetensors``)
and a ``config.json`` with LLaVA's ``mm_*`` keys, per modality of a :class:`MultimodalLM`
(``mil export --to llava``, and the modalities beside an HF Llava or a LLaVA-original directory).

With a shared connector, the modality's input layer is folded exactly into the projector's first
linear layer, so the exported projector maps the encoder's features straight to the LLM width;
every export is checked to reproduce the connector's output.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mil_plugins.atomic import atomic_save_safetensors
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


def _check_exact_mixed(model, modality: str, ptype: str, state: dict, mixer: dict) -> None:
    """Token-mixing connector: mixer then the LLaVA projector must reproduce its output."""
    from mil_plugins.projectors import build_projector

    conn = model.connector
    dtype = next(conn.parameters()).dtype
    proj = build_projector(ptype, conn.shared_dim, model.llm.get_input_embeddings().weight.shape[1])
    proj.load_state_dict(state)
    proj.to(dtype=dtype)
    x = torch.randn(2, conn.in_tokens[modality], conn.enc_hidden[modality], dtype=dtype)
    with torch.no_grad():
        mixed = torch.nn.functional.linear(x.reshape(2, -1), mixer["weight"], mixer["bias"])
        theirs = proj(mixed.view(2, conn.mix_tokens_of(modality), conn.shared_dim))
        ours = conn(modality, x)
    if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        raise ValueError(f"the {modality!r} connector is not a token mixer + plain LLaVA projector "
                         f"(a method wrapped it); its LLaVA export would not be exact")


def export_llava_one(model, modality: str, out: Path) -> list[Path]:
    """LLaVA projector files for ``modality``. A token-mixing connector (``mix_tokens``) has no
    per-token equivalent: the shared projector is written in LLaVA's layout (``mm_hidden_size`` =
    the shared width) and the mixer beside it, ``mm_input_layer.safetensors`` (``weight [K*S,
    T*D]``, ``bias``: flattened encoder features -> K tokens of width S), named in the config."""
    hidden = model.llm.get_input_embeddings().weight.shape[1]
    conn = model.connector
    plugin = model.plugins[modality]
    extra = {"mm_modality": modality, "mm_placeholder": plugin.placeholder,
             "mm_num_tokens": model.num_tokens[modality], "mm_encoder": plugin.config()}
    written = []
    if conn.mode == "shared" and conn.mix_tokens_of(modality):
        ptype, mm_hidden, state = conn.llava_projector_state(modality, fold_input_layer=False)
        mixer = conn.mixer_state(modality)
        _check_exact_mixed(model, modality, ptype, state, mixer)
        written.append(atomic_save_safetensors(out / "mm_input_layer.safetensors", mixer))
        extra["mm_input_layer"] = {"type": "token_mixer", "file": "mm_input_layer.safetensors",
                                   "encoder_tokens": conn.in_tokens[modality],
                                   "encoder_hidden_size": conn.enc_hidden[modality],
                                   "tokens": conn.mix_tokens_of(modality)}
    else:
        ptype, mm_hidden, state = conn.llava_projector_state(
            modality, fold_input_layer=conn.mode == "shared")
        _check_exact(model, modality, ptype, state)
    written.insert(0, save_llava_projector(out, state, projector_type=ptype, mm_hidden_size=mm_hidden,
                                           hidden_size=hidden, extra_config=extra))
    return written

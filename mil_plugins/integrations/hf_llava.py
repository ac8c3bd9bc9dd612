"""HF Llava, a format of another project: adopt a transformers ``LlavaForConditionalGeneration`` as image modality + projector + LLM,
and export the image modality + LLM of a :class:`MultimodalLM` back to one.

transformers 5.x layout::

    llava.model.vision_tower            -> encoders["image"].vision_tower   (HFVisionTowerEncoder)
    llava.model.multi_modal_projector   -> connector.projectors["image"]    (mlp2x_gelu; linear_1 -> 0,
                                                                            linear_2 -> 2)
    llava.model.language_model + lm_head -> llm (AutoModelForCausalLM of text_config)
    config.image_token_id               -> the "<image>" placeholder (num_tokens = image features)

``from_hf_llava`` shares the modules with the Llava model it is given (no copy; a 7B checkpoint is
not held twice): use one or the other afterwards, or pass ``copy_weights=True``.
``to_hf_llava`` builds a new Llava model holding copies. The other modalities are exported
elsewhere (LLaVA ``mm_projector.bin`` per modality, :mod:`mil_plugins.projectors.convert`).
:func:`build_from_llava` is a recipe's ``model.llm.llava``: an HF Llava or a LLaVA-original directory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mil_plugins.model.connector import Connector
from mil_plugins.model.hf_llava import (_WITHOUT_CLS, CLIP_MEAN, CLIP_STD, HFVisionTowerEncoder,
                                        LlavaVisionPlugin, llava_vision_tower)
from mil_plugins.model.mllm import MultimodalLM


def _causal_lm(language_model: nn.Module, lm_head: nn.Module, text_config) -> nn.Module:
    """An ``AutoModelForCausalLM`` of ``text_config`` whose decoder and head ARE the given modules."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(text_config)
    prefix = causal.base_model_prefix
    if not isinstance(getattr(causal, prefix, None), type(language_model)):
        raise TypeError(f"cannot adopt a {type(language_model).__name__} as "
                        f"{type(causal).__name__}.{prefix}")
    setattr(causal, prefix, language_model)
    causal.lm_head = lm_head
    leftovers = [n for n, t in list(causal.named_parameters()) + list(causal.named_buffers())
                 if t.is_meta]
    if leftovers:
        raise RuntimeError(f"adopting the language model left uninitialised tensors {leftovers[:5]}")
    return causal


def from_hf_llava(llava: nn.Module, tokenizer: Any, *, copy_weights: bool = False) -> MultimodalLM:
    """A :class:`MultimodalLM` with ``llava``'s vision tower as the ``image`` encoder, its projector
    as ``connector.projectors["image"]`` (per_modality, ``mlp2x_gelu``) and its language model +
    ``lm_head`` as the LLM. ``tokenizer`` is the checkpoint's; ``<image>`` is added when missing."""
    from mil_plugins.projectors.convert import from_hf_llava as projector_from_hf

    if copy_weights:
        llava = copy.deepcopy(llava)
    cfg = llava.config
    inner = llava.model
    if cfg.projector_hidden_act != "gelu":
        raise ValueError(f"Llava projector activation {cfg.projector_hidden_act!r}: only 'gelu' "
                         f"(LLaVA's mlp2x_gelu) can be adopted")
    text_config = inner.language_model.config
    causal = _causal_lm(inner.language_model, llava.lm_head, text_config)

    tower = inner.vision_tower
    encoder = HFVisionTowerEncoder(tower, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
    vc = tower.config
    mean, std = CLIP_MEAN, CLIP_STD
    if vc.model_type in _WITHOUT_CLS:
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    plugin = LlavaVisionPlugin(vision_config=vc.to_dict(),
                               vision_feature_layer=cfg.vision_feature_layer,
                               vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                               image_size=getattr(vc, "image_size", None), mean=mean, std=std)
    connector = Connector(text_config.hidden_size, "per_modality", "mlp2x_gelu")
    model = MultimodalLM(causal, tokenizer, connector)
    model.add_modality(plugin, encoder=encoder, projector_type="mlp2x_gelu")

    proj = model.connector.projectors["image"]
    src = {f"multi_modal_projector.{k}": v for k, v in inner.multi_modal_projector.state_dict().items()}
    state = projector_from_hf(src)
    for key in ("0.bias", "2.bias"):  # multimodal_projector_bias=False: our biases are zero
        if key not in state:
            state[key] = torch.zeros_like(proj.state_dict()[key])
    with torch.no_grad():
        proj.load_state_dict({k: v.to(proj.state_dict()[k].dtype) for k, v in state.items()})
    model.build_info = {"llm": {"hf_llava": str(getattr(cfg, "_name_or_path", "") or "")},
                        "lora": None,
                        "dtype": str(model.llm.get_input_embeddings().weight.dtype).replace("torch.", "")}
    return model


def to_hf_llava(model: MultimodalLM):
    """A new ``LlavaForConditionalGeneration`` with copies of the image encoder (must be an
    :class:`HFVisionTowerEncoder`), the image projector (``mlp2x_gelu``; in shared connector mode
    the input layer is folded into it exactly) and the LLM (LoRA merged into a copy, if any)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from mil_plugins.projectors.convert import to_hf_llava as projector_to_hf

    if "image" not in model.plugins:
        raise ValueError(f"to_hf_llava: the model has no 'image' modality ({model.modalities})")
    tower, feature_layer, strategy = llava_vision_tower(model.encoders["image"])
    ptype, mm_hidden, proj_state = model.connector.llava_projector_state("image", fold_input_layer=True)
    if ptype != "mlp2x_gelu":
        raise ValueError(f"to_hf_llava: Llava's projector is mlp2x_gelu; the image projector is {ptype!r}")
    base = model.base_llm()
    if model.is_peft:
        base = copy.deepcopy(model.llm).merge_and_unload()
    dtype = base.get_input_embeddings().weight.dtype
    text_config = copy.deepcopy(base.config)
    config = LlavaConfig(
        vision_config=copy.deepcopy(tower.config),
        text_config=text_config,
        image_token_index=model.placeholder_ids["image"],
        image_seq_length=model.num_tokens["image"],
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    llava = LlavaForConditionalGeneration(config).to(dtype)
    state: dict[str, torch.Tensor] = {}
    state.update({f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()})
    state.update({f"model.{k}": v for k, v in projector_to_hf(proj_state, ptype).items()})
    decoder = getattr(base, base.base_model_prefix)
    state.update({f"model.language_model.{k}": v for k, v in decoder.state_dict().items()})
    state["lm_head.weight"] = base.get_output_embeddings().weight
    missing, unexpected = llava.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"to_hf_llava: state does not fit: missing {missing}, unexpected {unexpected}")
    return llava


def build_from_llava(source: str, tokenizer: Any, modalities: dict[str, dict], *,
                     projector_type: str | None = "mlp2x_gelu",
                     projector_types: dict[str, str] | None = None,
                     lora: dict | None = None, dtype: torch.dtype = torch.float32) -> MultimodalLM:
    """A recipe's model adopted from a ``LlavaForConditionalGeneration`` checkpoint (hub id such
    as ``llava-hf/llava-1.5-7b-hf``, or a directory) or from a LLaVA-original directory
    (``model_type: llava_llama``, see :mod:`mil_plugins.integrations.llava_fork`): Llava's tower
    and projector are the image modality, every other modality of the recipe gets its plugin's
    encoder and a projector of its own (per-modality connector), unless the directory brought it,
    and LoRA is applied to the LLM when the recipe asks for it."""
    import json

    from transformers import LlavaForConditionalGeneration

    from mil_plugins.model.build import apply_lora
    from mil_plugins.plugins import MODALITIES

    config = Path(str(source)) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "llava_llama":
        from mil_plugins.integrations.llava_fork.checkpoint import adopt_llava_dir

        model = adopt_llava_dir(source, tokenizer, dtype=dtype)
    else:
        model = from_hf_llava(LlavaForConditionalGeneration.from_pretrained(str(source), dtype=dtype),
                              tokenizer)
    for name, options in modalities.items():
        if name in model.plugins:
            continue  # the adopted tower is the image modality; a sidecar brings its own
        plugin = MODALITIES.get(name)(**dict(options or {}))
        model.add_modality(plugin, projector_type=(projector_types or {}).get(name) or projector_type)
    if lora:
        model.llm = apply_lora(model.llm, dict(lora))
    model.to(dtype)
    model.build_info["lora"] = copy.deepcopy(lora)
    return model


def export_hf(model, out: Path) -> list[Path]:
    """``mil export --to hf``: ``out/`` as ``LlavaForConditionalGeneration.from_pretrained`` loads it;
    every other modality's encoder and LLaVA projector files under ``out/modalities/<modality>/``."""
    from mil_plugins.atomic import atomic_save_safetensors, atomic_write_json
    from mil_plugins.integrations.llava_projector import export_llava_one

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

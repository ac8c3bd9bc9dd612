"""Adopt a transformers ``LlavaForConditionalGeneration`` as image modality + projector + LLM,
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
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mil_plugins.modality import ModalityEncoder, ModalityInputError, ModalityPlugin
from mil_plugins.model.connector import Connector
from mil_plugins.model.mllm import MultimodalLM

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_WITH_CLS = {"clip_vision_model"}      # towers whose sequence starts with a CLS token
_WITHOUT_CLS = {"siglip_vision_model"}


def _vision_config_from_dict(d: dict[str, Any]):
    from transformers import CONFIG_MAPPING

    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ValueError("vision_config needs a 'model_type' (e.g. 'clip_vision_model')")
    return CONFIG_MAPPING[model_type].from_dict(d)


def _as_layers(layer: int | list[int]) -> list[int]:
    return [layer] if isinstance(layer, int) else [int(x) for x in layer]


class HFVisionTowerEncoder(ModalityEncoder):
    """A transformers vision tower (CLIP / SigLIP ...) as a :class:`ModalityEncoder`, selecting
    features the way Llava does: hidden states of ``feature_layer`` (int, or a list whose states are
    concatenated), ``select_strategy`` ``"default"`` drops the first (CLS) token, ``"full"`` keeps it.
    The tower is the submodule ``vision_tower`` (state keys ``vision_tower.*``)."""

    def __init__(self, vision_tower: nn.Module, feature_layer: int | list[int] = -2,
                 select_strategy: str = "default", num_tokens: int | None = None):
        super().__init__()
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {select_strategy!r}")
        self.vision_tower = vision_tower
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        vc = vision_tower.config
        self.hidden_size = int(vc.hidden_size) * len(_as_layers(feature_layer))
        self.num_tokens = int(num_tokens) if num_tokens is not None else self._count_tokens()

    def _count_tokens(self) -> int:
        vc = self.vision_tower.config
        size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
        if vc.model_type in _WITH_CLS | _WITHOUT_CLS and size and patch:
            n = (int(size) // int(patch)) ** 2 + (1 if vc.model_type in _WITH_CLS else 0)
            return n - (1 if self.select_strategy == "default" else 0)
        p = next(self.vision_tower.parameters())
        channels = int(getattr(vc, "num_channels", 3))
        with torch.no_grad():
            x = torch.zeros(1, channels, int(size), int(size), device=p.device, dtype=p.dtype)
            return int(self.forward(x).shape[1])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        states = [out.hidden_states[i] for i in _as_layers(self.feature_layer)]
        if self.select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return states[0] if len(states) == 1 else torch.cat(states, dim=-1)


class LlavaVisionPlugin(ModalityPlugin):
    """The image modality of an adopted Llava checkpoint: its vision tower (rebuilt from
    ``vision_config`` -- random init, the weights come from the checkpoint) and LLaVA/CLIP image
    preprocessing (the registry's ``image`` plugin when installed, else a minimal internal one:
    RGB, shorter side -> ``image_size`` bicubic, centre crop, ``(x/255 - mean) / std``)."""

    name = "image"
    key = "image"
    placeholder = "<image>"
    default_projector = "mlp2x_gelu"
    extensions = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
    default_options: dict[str, Any] = {
        "vision_config": None,                      # the tower's config as a dict (model_type in it)
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_size": None,                         # None: vision_config.image_size
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "trainable": False,
    }

    def _image_size(self) -> int:
        size = self.options.get("image_size") or (self.options.get("vision_config") or {}).get("image_size")
        if not size:
            raise ValueError("LlavaVisionPlugin: image_size unknown (set the option)")
        return int(size)

    def preprocess(self, path: str | Path) -> torch.Tensor:
        size = self._image_size()
        try:
            from mil_plugins.plugins import MODALITIES

            image_cls = MODALITIES.get("image")
            if image_cls is not type(self):
                patch = (self.options.get("vision_config") or {}).get("patch_size")
                opts = {"image_size": size, "mean": self.options["mean"], "std": self.options["std"]}
                if patch and "patch_size" in getattr(image_cls, "default_options", {}):
                    opts["patch_size"] = int(patch)
                return image_cls(**opts).preprocess(path)
        except ModalityInputError:
            raise
        except Exception:  # registry image plugin missing or with other options: fall back
            pass
        return _minimal_image_preprocess(path, size, self.options["mean"], self.options["std"])

    def build_encoder(self) -> HFVisionTowerEncoder:
        from transformers import AutoModel

        vc = self.options.get("vision_config")
        if not vc:
            raise ValueError("LlavaVisionPlugin needs the 'vision_config' option")
        tower = AutoModel.from_config(_vision_config_from_dict(vc))
        return HFVisionTowerEncoder(tower, self.options["vision_feature_layer"],
                                    self.options["vision_feature_select_strategy"])


def _minimal_image_preprocess(path, size: int, mean, std) -> torch.Tensor:
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ModalityInputError(path, "file not found", "image")
    try:
        img = Image.open(p)
        img.load()
    except Exception as exc:
        raise ModalityInputError(path, f"cannot read image ({type(exc).__name__}: {exc})",
                                 "image") from None
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    x = x.permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


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


def llava_vision_tower(enc: nn.Module) -> tuple[nn.Module, int | list[int], str]:
    """``(transformers vision tower, vision_feature_layer, vision_feature_select_strategy)`` of an
    image encoder that Llava can hold: an adopted tower, or the image plugin's pretrained tower
    (``encoders.image`` with ``pretrained:`` a CLIP/SigLIP checkpoint)."""
    if isinstance(enc, HFVisionTowerEncoder):
        return enc.vision_tower, enc.feature_layer, enc.select_strategy
    tower = getattr(enc, "tower", None)
    hf_model = getattr(tower, "model", None)
    if hf_model is not None and hasattr(hf_model, "config") and hasattr(tower, "prefix"):
        if tower.num_prefix == tower.prefix:
            strategy = "full"            # every token kept (SigLIP, or cls_patch)
        elif tower.prefix == 1 and tower.num_prefix == 0:
            strategy = "default"         # CLS dropped, as Llava's "default" does
        else:
            raise ValueError(f"to_hf_llava: a tower with {tower.prefix} prefix tokens of which "
                             f"{tower.num_prefix} are kept has no Llava feature-select strategy")
        return hf_model, tower.select_layer, strategy
    raise TypeError(f"to_hf_llava: the image encoder is a {type(enc).__name__} without a "
                    f"transformers vision tower; set `pretrained:` on the image modality (a CLIP "
                    f"or SigLIP checkpoint) to export to LlavaForConditionalGeneration")


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

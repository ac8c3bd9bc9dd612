"""An HF vision tower (CLIP / SigLIP, as transformers' ``LlavaForConditionalGeneration`` holds it)
as the ``image`` modality: :class:`HFVisionTowerEncoder` and :class:`LlavaVisionPlugin`, and
:func:`llava_vision_tower` (the tower, feature layer and select strategy of an image encoder that
Llava can hold). Converting a whole Llava model to and from a :class:`MultimodalLM` is a format of
another project: :mod:`mil_plugins.integrations.hf_llava`.

(The class path ``mil_plugins.model.hf_llava:LlavaVisionPlugin`` is recorded in saved models.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mil_plugins.modality import ModalityEncoder, ModalityInputError, ModalityPlugin

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

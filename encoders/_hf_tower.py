"""transformers vision towers (CLIP, SigLIP, any ``AutoModel`` taking ``pixel_values``) (private).

* :func:`load_hf_vision_model` -- a pretrained tower from a hub id or a local directory.
* :func:`tiny_clip` -- a small random-init ``CLIPVisionModel`` built from options (no download): the
  tower ``mil export --to hf`` can put into ``LlavaForConditionalGeneration`` as it is.
* :class:`HFVisionTower` -- LLaVA's feature selection on either: hidden states at ``select_layer``,
  ``select_feature`` ``"patch"`` (prefix tokens such as CLS dropped) or ``"cls_patch"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from encoders._transformer import select_hidden


def load_hf_vision_model(pretrained: str) -> nn.Module:
    """A transformers vision tower from a hub id or local directory.

    CLIP and SigLIP checkpoints (full or vision-only) load as ``CLIPVisionModel`` /
    ``SiglipVisionModel`` (the text tower is not loaded); anything else through ``AutoModel``, using
    its ``vision_model`` sub-module when it has one.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(pretrained)
    model_type = getattr(config, "model_type", "")
    by_type = {"clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
               "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"}
    if model_type in by_type:
        model = getattr(transformers, by_type[model_type]).from_pretrained(pretrained)
    else:
        model = transformers.AutoModel.from_pretrained(pretrained)
        model = getattr(model, "vision_model", model)
    return model.eval()


def tiny_clip(options: dict[str, Any], in_chans: int) -> nn.Module:
    """A random-init ``CLIPVisionModel`` of the tiny-tower size options (seed it from outside)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hidden = int(options["hidden_size"])
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=int(hidden * options["mlp_ratio"]),
                              num_hidden_layers=int(options["layers"]),
                              num_attention_heads=int(options["heads"]),
                              image_size=int(options["image_size"]),
                              patch_size=int(options["patch_size"]), num_channels=int(in_chans))
    return CLIPVisionModel(config).eval()


def vision_config(model: nn.Module) -> Any:
    config = model.config
    return getattr(config, "vision_config", None) or config


class HFVisionTower(nn.Module):
    """A transformers vision tower, LLaVA feature selection: ``[B, C, S, S] -> [B, T, D]``.

    ``select_layer`` indexes ``hidden_states`` (LLaVA's ``mm_vision_select_layer``; -2 = penultimate
    layer). ``select_feature="patch"`` drops the prefix tokens (CLS for CLIP, CLS + registers for
    DINOv2-with-registers, none for SigLIP), ``"cls_patch"`` keeps them. The number of tokens and
    the prefix length are measured with one dummy forward at build time. ``model`` is the
    transformers module (``to_hf_llava`` reads it).
    """

    def __init__(self, model: nn.Module, *, image_size: int, select_layer: int,
                 select_feature: str, modality: str, source: str):
        super().__init__()
        self.model = model
        self.select_layer = select_layer
        self.image_size = image_size
        cfg = vision_config(self.model)
        expected = getattr(cfg, "image_size", None)
        if isinstance(expected, int) and expected != image_size:
            raise ValueError(
                f"modality {modality!r}: {source} expects {expected}x{expected} images; "
                f"set the option image_size: {expected} (it is {image_size})")
        patch = getattr(cfg, "patch_size", None)
        if not isinstance(patch, int):
            raise ValueError(f"modality {modality!r}: cannot read patch_size from {source}'s "
                             f"config; only ViT-like towers are supported")
        self.in_chans = int(getattr(cfg, "num_channels", 3))
        self.grid = (image_size // patch, image_size // patch)
        with torch.no_grad():
            probe = self._hidden(torch.zeros(1, self.in_chans, image_size, image_size))
        total = probe.shape[1]
        n_patch = self.grid[0] * self.grid[1]
        if total < n_patch:
            raise ValueError(f"modality {modality!r}: {source} returns {total} tokens for "
                             f"{n_patch} patches")
        self.prefix = total - n_patch
        self.num_prefix = self.prefix if select_feature == "cls_patch" else 0
        self.num_tokens = n_patch + self.num_prefix
        self.hidden_size = int(probe.shape[-1])

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        out = self.model(pixel_values=x.to(param.device, param.dtype), output_hidden_states=True)
        return select_hidden(out, self.select_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._hidden(x)
        if not self.num_prefix:
            h = h[:, self.prefix:]
        return h.to(x.dtype)

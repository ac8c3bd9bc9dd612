"""The image / video / depth tower from options, and the token-grid pooling of video (private).

Which tower (first match):

* ``pretrained: <hub id | dir>`` -- a transformers tower (CLIP, SigLIP, AutoModel), :mod:`encoders._hf_tower`;
* ``timm_model: <id>`` -- ``timm.create_model(id, pretrained=timm_pretrained)``, :mod:`encoders._timm_tower`;
* otherwise a tiny random-init tower of the size options, built (no download) by ``tiny_tower``:
  ``timm`` (a timm ``VisionTransformer``) or ``clip`` (transformers' ``CLIPVisionModel``, the one
  ``mil export --to hf`` puts into ``LlavaForConditionalGeneration`` as it is).

Every tower exposes ``hidden_size``, ``num_tokens``, ``num_prefix`` (prefix tokens kept at the
front), ``grid`` (patch grid ``(h, w)``) and ``select_layer``.
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from encoders._hf_tower import HFVisionTower, load_hf_vision_model, tiny_clip
from encoders._timm_tower import TimmTower, check_timm_id, create_timm_model, tiny_vit

TINY_TOWERS = ("timm", "clip")


def library_versions() -> str:
    """timm and transformers versions, part of the vision plugins' ``version`` (feature-cache key):
    the towers' code lives in those libraries, which the plugin-source hash does not see."""
    found = []
    for dist in ("timm", "transformers"):
        try:
            found.append(f"{dist}-{metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist}-none")
    return "+".join(found)


def check_tower_options(options: dict[str, Any], modality: str) -> None:
    """Which-tower options: one source at most, a known tiny tower, a timm id timm knows."""
    if options["tiny_tower"] not in TINY_TOWERS:
        raise ValueError(f"modality {modality!r}: option tiny_tower={options['tiny_tower']!r} is "
                         f"not one of {list(TINY_TOWERS)}")
    if options["pretrained"] and options["timm_model"]:
        raise ValueError(f"modality {modality!r}: set pretrained (a transformers tower) or "
                         f"timm_model (a timm tower), not both")
    if options["timm_model"]:
        check_timm_id(str(options["timm_model"]), modality)


def build_vision_tower(options: dict[str, Any], in_chans: int, modality: str) -> nn.Module:
    """The tower the options name (see the module doc). Seed it from outside (``seeded``)."""
    select_layer, feature = options["select_layer"], options["select_feature"]
    if options["pretrained"]:
        if in_chans != 3:
            raise ValueError(f"modality {modality!r}: pretrained transformers towers take 3-channel "
                             f"input; this configuration produces {in_chans} channels")
        source = str(options["pretrained"])
        return HFVisionTower(load_hf_vision_model(source), image_size=options["image_size"],
                             select_layer=-2 if select_layer is None else select_layer,
                             select_feature=feature, modality=modality, source=source)
    if options["timm_model"]:
        model = create_timm_model(str(options["timm_model"]), pretrained=bool(options["timm_pretrained"]),
                                  image_size=int(options["image_size"]), in_chans=in_chans)
        return TimmTower(model.eval(), select_layer=-2 if select_layer is None else select_layer,
                         select_feature=feature, modality=modality)
    select_layer = -1 if select_layer is None else select_layer
    if options["tiny_tower"] == "clip":
        return HFVisionTower(tiny_clip(options, in_chans), image_size=options["image_size"],
                             select_layer=select_layer, select_feature=feature, modality=modality,
                             source="the tiny CLIP tower")
    return TimmTower(tiny_vit(options, in_chans).eval(), select_layer=select_layer,
                     select_feature=feature, modality=modality)


def spatial_pool(tokens: torch.Tensor, grid: tuple[int, int], num_prefix: int,
                 stride: int) -> torch.Tensor:
    """Average-pool the patch-token grid by ``stride`` (prefix tokens kept as they are)."""
    if stride <= 1:
        return tokens
    prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
    b, _, d = patches.shape
    grid_map = patches.transpose(1, 2).reshape(b, d, *grid)
    pooled = F.avg_pool2d(grid_map, stride, stride, ceil_mode=True).flatten(2).transpose(1, 2)
    return torch.cat([prefix, pooled], 1)


def pooled_grid(grid: tuple[int, int], stride: int) -> tuple[int, int]:
    return (math.ceil(grid[0] / stride), math.ceil(grid[1] / stride)) if stride > 1 else grid

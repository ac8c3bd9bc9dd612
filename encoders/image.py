"""Image modality: PNG / JPEG / WebP (anything Pillow reads) -> ``[3, S, S]`` -> tower tokens.

Preprocessing (LLaVA / CLIP style): EXIF orientation applied, converted to RGB (16-bit grayscale is
scaled, not clipped), shorter side resized to ``image_size`` (``resample``, bicubic by default),
centre crop ``image_size`` x ``image_size``, then ``(x / 255 - mean) / std`` (CLIP's mean/std by
default; SigLIP checkpoints want ``mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]``).

Encoder (:mod:`encoders._towers`): ``timm_model: <timm id>`` -> ``timm.create_model(id,
pretrained=timm_pretrained)`` (EVA-CLIP-g, CLIP ViT-L, SigLIP ...); ``pretrained: <hub id | local
dir>`` -> a transformers CLIP / SigLIP / AutoModel vision tower; neither -> a tiny random-init tower
built from the size options without any download (defaults: 32x32 input, 8x8 patches -> 16 tokens
of width 64) by ``tiny_tower``: ``timm`` (a timm ``VisionTransformer``) or ``clip`` (transformers'
``CLIPVisionModel``, which ``mil export --to hf`` writes into ``LlavaForConditionalGeneration``).
Features: block output ``select_layer`` (``null``: -2 for timm ids and pretrained towers as in
LLaVA, the last block for tiny towers), ``select_feature`` ``"patch"`` or ``"cls_patch"``. A
transformers tower needs ``image_size`` equal to the checkpoint's (224 / 336 / 384 ...); timm
resamples its position embedding to ``image_size``. ``hidden_size``, ``patch_size``, ``layers``,
``heads``, ``mlp_ratio`` size the tiny towers only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from encoders._common import (CLIP_MEAN, CLIP_STD, IMAGE_EXTENSIONS, check_vit_options,
                              finish_encoder, image_tensor, open_image, seeded)
from encoders._towers import build_vision_tower, library_versions
from mil_plugins.modality import ModalityEncoder, ModalityPlugin

VIT_OPTIONS: dict[str, Any] = {
    "image_size": 32,          # input side S (must equal the checkpoint's when pretrained)
    "patch_size": 8,           # tiny tower only
    "hidden_size": 64,         # tiny tower only (pretrained: from the checkpoint)
    "layers": 2,               # tiny tower only
    "heads": 4,                # tiny tower only
    "mlp_ratio": 2.0,          # tiny tower only
    "mean": CLIP_MEAN,
    "std": CLIP_STD,
    "resample": "bicubic",     # Pillow filter for the resize
    "tiny_tower": "timm",      # no pretrained / timm_model: "timm" (VisionTransformer) | "clip"
                               # (transformers CLIPVisionModel: exports to LlavaForConditionalGeneration)
    "timm_model": None,        # a timm model id, e.g. vit_large_patch14_clip_336.openai
    "timm_pretrained": True,   # with timm_model: timm fetches its weights (false: random init)
    "pretrained": None,        # a transformers tower: hub id | local directory
    "select_layer": None,      # null: -2 timm_model / pretrained (LLaVA), -1 tiny
    "select_feature": "patch",  # "patch" (drop CLS) | "cls_patch"
    "trainable": False,        # frozen by default (the engine reads this)
    "init_seed": 0,            # seed of a random init (null: torch's global RNG)
}


class VisionEncoder(ModalityEncoder):
    """A vision tower as a :class:`ModalityEncoder`: ``[B, C, S, S] -> [B, T, D]``."""

    def __init__(self, tower: torch.nn.Module):
        super().__init__()
        self.tower = tower
        self.hidden_size = int(tower.hidden_size)
        self.num_tokens = int(tower.num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(x)


class ImagePlugin(ModalityPlugin):
    name = "image"
    key = "image"
    placeholder = "<image>"
    default_projector = "mlp2x_gelu"
    extensions = IMAGE_EXTENSIONS
    default_options: dict[str, Any] = dict(VIT_OPTIONS)

    def __init__(self, **options: Any):
        super().__init__(**options)
        check_vit_options(self.options, self.name)

    @property
    def version(self) -> str:  # the towers' code is timm's / transformers': their versions count
        return f"1;{library_versions()}"

    def preprocess(self, path: str | Path) -> torch.Tensor:
        """Image file -> float32 ``[3, image_size, image_size]``."""
        return image_tensor(open_image(path, self.name), self.options)

    def build_encoder(self) -> VisionEncoder:
        with seeded(self.options["init_seed"]):
            encoder = VisionEncoder(build_vision_tower(self.options, 3, self.name))
        return finish_encoder(encoder, self.options)

"""timm vision towers (private): any timm model id, or a tiny ``VisionTransformer`` from options.

* :func:`create_timm_model` -- ``timm.create_model(id, pretrained=...)`` for real recipes (EVA-CLIP-g
  as PathWeave uses, CLIP ViT-L, SigLIP ...); weights are fetched by timm only when asked for.
* :func:`tiny_vit` -- a small random-init timm ``VisionTransformer`` built from the size options
  (no download): fixed 2-D sin-cos position embedding on the patches (a learnable parameter
  initialised deterministically), CLS token in front, no dropout, so train and eval modes give
  identical outputs.
* :class:`TimmTower` -- LLaVA's feature selection on either, through timm's
  ``forward_intermediates``: the output of block ``select_layer`` without the final norm,
  ``select_feature`` ``"patch"`` (prefix tokens -- CLS, registers -- dropped) or ``"cls_patch"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def check_timm_id(model_id: str, modality: str) -> None:
    """A clear one-line error when ``model_id`` is not a timm model (nothing is downloaded)."""
    import difflib

    import timm

    arch, _, tag = model_id.partition(".")
    if not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise ValueError(f"modality {modality!r}: timm_model {model_id!r} is not a timm model"
                         + (f" (did you mean {' or '.join(near)}?)" if near else ""))
    if tag and model_id not in timm.list_pretrained(model_id):
        tags = timm.list_pretrained(f"{arch}.*")[:5]
        raise ValueError(f"modality {modality!r}: timm has no pretrained tag {tag!r} for {arch}"
                         + (f" (it has: {', '.join(tags)})" if tags else ""))


def create_timm_model(model_id: str, *, pretrained: bool, image_size: int, in_chans: int) -> nn.Module:
    """``timm.create_model`` without a classifier head; timm resamples the position embedding when
    ``image_size`` differs from the checkpoint's and adapts the patch embedding to ``in_chans``."""
    import timm

    return timm.create_model(model_id, pretrained=pretrained, num_classes=0, img_size=image_size,
                             in_chans=in_chans)


def tiny_vit(options: dict[str, Any], in_chans: int) -> nn.Module:
    """A timm ``VisionTransformer`` of the size options, random init (seed it from outside)."""
    from timm.layers import build_sincos2d_pos_embed
    from timm.models.vision_transformer import VisionTransformer

    size, patch, dim = int(options["image_size"]), int(options["patch_size"]), int(options["hidden_size"])
    model = VisionTransformer(img_size=size, patch_size=patch, in_chans=in_chans, num_classes=0,
                              global_pool="", embed_dim=dim, depth=int(options["layers"]),
                              num_heads=int(options["heads"]), mlp_ratio=float(options["mlp_ratio"]),
                              class_token=True, no_embed_class=True)
    grid = model.patch_embed.grid_size
    with torch.no_grad():
        model.pos_embed.copy_(build_sincos2d_pos_embed(list(grid), dim).reshape(1, -1, dim))
    return model


class TimmTower(nn.Module):
    """A timm ViT-like model, LLaVA feature selection: ``[B, C, S, S] -> [B, T, D]``.

    ``select_layer`` counts like transformers' ``hidden_states`` (``i`` = output of block ``i``, -1
    the last block, -2 the penultimate as LLaVA uses, 0 = the embeddings, the first block's input).
    Blocks after the selected one are not run. ``model`` is the timm module.
    """

    def __init__(self, model: nn.Module, *, select_layer: int, select_feature: str, modality: str):
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"modality {modality!r}: timm model {type(model).__name__} has no "
                             f"forward_intermediates; use a ViT-like model (vit_*, eva*, deit*)")
        self.model = model
        n = len(model.blocks)
        index = select_layer + n + 1 if select_layer < 0 else select_layer
        if not 0 <= index <= n:
            raise ValueError(f"modality {modality!r}: select_layer {select_layer} out of range for "
                             f"{n} blocks (0..{n} or -{n}..-1)")
        self.block = index - 1
        self.select_layer = select_layer
        self.prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.num_prefix = self.prefix if select_feature == "cls_patch" else 0
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
        self.image_size = int(model.patch_embed.img_size[0])
        self.in_chans = int(model.patch_embed.proj.in_channels)
        self.hidden_size = int(model.embed_dim)
        self.num_tokens = self.grid[0] * self.grid[1] + self.num_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_chans, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        param = next(self.model.parameters())
        x_in = x.to(param.device, param.dtype)
        if self.block < 0:
            tokens = self._embeddings(x_in)
        else:
            patches, prefix = self.model.forward_intermediates(
                x_in, indices=[self.block], return_prefix_tokens=True, norm=False,
                stop_early=True, output_fmt="NLC", intermediates_only=True)[0]
            tokens = torch.cat([prefix, patches], 1)
        return (tokens if self.num_prefix else tokens[:, self.prefix:]).to(x.dtype)

    def _embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """The first block's input (embeddings, prefix tokens in front), stopping there."""
        captured: list[torch.Tensor] = []

        def stop(_module, args):
            captured.append(args[0])
            raise _Stop

        handle = self.model.blocks[0].register_forward_pre_hook(stop)
        try:
            self.model.forward_features(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]


class _Stop(Exception):
    """Raised by the pre-hook of :meth:`TimmTower._embeddings` once it has the embeddings."""

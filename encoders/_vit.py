"""Shared transformer / ViT code of the built-in encoders (private).

* :class:`Transformer` -- pre-norm blocks (own attention on ``scaled_dot_product_attention``: no
  dropout, no eval-mode fast path, so train and eval modes give identical outputs).
* :class:`TinyViT` -- patch-embedding conv + CLS token + 2-D sin-cos positional embedding (a
  learnable parameter initialised deterministically) + ``layers`` blocks. Built from options alone.
* :class:`HFVisionTower` -- a transformers vision tower (CLIP, SigLIP, or any ``AutoModel`` that
  takes ``pixel_values``) loaded with ``from_pretrained``; hidden states at ``select_layer`` and
  ``select_feature`` as LLaVA's ``CLIPVisionTower`` does (``"patch"`` drops the prefix tokens such
  as CLS, ``"cls_patch"`` keeps them).

Both towers expose ``hidden_size``, ``num_tokens``, ``num_prefix`` (CLS-like tokens kept at the
front) and ``grid`` (patch grid ``(h, w)``), which the video encoder uses for spatial pooling.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


# ---- transformer --------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """``layers`` pre-norm blocks; :meth:`forward` returns the hidden state ``select_layer``.

    Hidden states are numbered as in transformers: 0 is the input (embeddings), ``i`` the output of
    block ``i``; negative values count from the end (-1 = last block). Blocks after the selected one
    are not run.
    """

    def __init__(self, dim: int, layers: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(layers))

    def resolve(self, select_layer: int) -> int:
        n = len(self.blocks)
        index = select_layer + n + 1 if select_layer < 0 else select_layer
        if not 0 <= index <= n:
            raise ValueError(f"select_layer {select_layer} out of range for {n} layers")
        return index

    def forward(self, x: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        for block in self.blocks[: self.resolve(select_layer)]:
            x = block(x)
        return x


def init_weights(module: nn.Module) -> None:
    """ViT-style init: truncated normal(0.02) Linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin-cos position table ``[n, dim]`` (as in "Attention is all you need")."""
    pos = np.arange(n, dtype=np.float64)[:, None]
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / max(1, dim // 2))
    out = np.zeros((n, dim))
    out[:, 0: 2 * (dim // 2): 2] = np.sin(pos * omega)
    out[:, 1: 2 * (dim // 2): 2] = np.cos(pos * omega)
    return torch.from_numpy(out).float()


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table ``[h * w, dim]`` (MAE): half the channels per axis."""
    half = dim // 2
    ys = sincos_1d(h, half)[:, None, :].expand(h, w, half)
    xs = sincos_1d(w, dim - half)[None, :, :].expand(h, w, dim - half)
    return torch.cat([ys, xs], -1).reshape(h * w, dim)


# ---- tiny ViT -----------------------------------------------------------------------------------

class TinyViT(nn.Module):
    """Small random-init ViT: ``[B, C, S, S] -> [B, T, D]``.

    Tokens: ``(S / patch_size) ** 2`` patch tokens, plus the CLS token in front when
    ``select_feature == "cls_patch"``. No final LayerNorm (the selected hidden state is returned as
    is, like LLaVA's penultimate-layer features) and no dropout.
    """

    def __init__(self, *, in_chans: int, image_size: int, patch_size: int, hidden_size: int,
                 layers: int, heads: int, mlp_ratio: float = 2.0, select_layer: int = -1,
                 select_feature: str = "patch"):
        super().__init__()
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.hidden_size = hidden_size
        self.select_layer = select_layer
        self.num_prefix = 1 if select_feature == "cls_patch" else 0
        self.num_tokens = self.grid[0] * self.grid[1] + self.num_prefix
        self.image_size = image_size
        self.in_chans = in_chans
        self.patch_embed = nn.Conv2d(in_chans, hidden_size, kernel_size=patch_size,
                                     stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(sincos_2d(*self.grid, hidden_size)[None])
        self.transformer = Transformer(hidden_size, layers, heads, mlp_ratio)
        init_weights(self.transformer)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.transformer.resolve(select_layer)  # validate early

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.in_chans, self.image_size, self.image_size):
            raise ValueError(f"expected input [B, {self.in_chans}, {self.image_size}, "
                             f"{self.image_size}], got {list(x.shape)}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1)
        out = self.transformer(tokens, self.select_layer)
        return out if self.num_prefix else out[:, 1:]


# ---- transformers (pretrained) towers -----------------------------------------------------------

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


def vision_config(model: nn.Module) -> Any:
    config = model.config
    return getattr(config, "vision_config", None) or config


def select_hidden(outputs: Any, select_layer: int) -> torch.Tensor:
    hidden = getattr(outputs, "hidden_states", None)
    if hidden is None:
        raise ValueError("the pretrained model did not return hidden_states")
    return hidden[select_layer]


class HFVisionTower(nn.Module):
    """A pretrained transformers vision tower, LLaVA feature selection: ``[B,3,S,S]->[B,T,D]``.

    ``select_layer`` indexes ``hidden_states`` (LLaVA's ``mm_vision_select_layer``; -2 = penultimate
    layer). ``select_feature="patch"`` drops the prefix tokens (CLS for CLIP, CLS + registers for
    DINOv2-with-registers, none for SigLIP), ``"cls_patch"`` keeps them. The number of tokens and
    the prefix length are measured with one dummy forward at build time.
    """

    def __init__(self, pretrained: str, *, image_size: int, select_layer: int,
                 select_feature: str, modality: str):
        super().__init__()
        self.model = load_hf_vision_model(pretrained)
        self.select_layer = select_layer
        self.image_size = image_size
        cfg = vision_config(self.model)
        expected = getattr(cfg, "image_size", None)
        if isinstance(expected, int) and expected != image_size:
            raise ValueError(
                f"modality {modality!r}: {pretrained} expects {expected}x{expected} images; "
                f"set the option image_size: {expected} (it is {image_size})")
        patch = getattr(cfg, "patch_size", None)
        if not isinstance(patch, int):
            raise ValueError(f"modality {modality!r}: cannot read patch_size from {pretrained}'s "
                             f"config; only ViT-like towers are supported")
        self.grid = (image_size // patch, image_size // patch)
        with torch.no_grad():
            probe = self._hidden(torch.zeros(1, 3, image_size, image_size))
        total = probe.shape[1]
        n_patch = self.grid[0] * self.grid[1]
        if total < n_patch:
            raise ValueError(f"modality {modality!r}: {pretrained} returns {total} tokens for "
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


def build_vision_tower(options: dict[str, Any], in_chans: int, modality: str) -> nn.Module:
    """The tiny ViT (``pretrained: null``) or a pretrained transformers tower, from options."""
    select_layer = options["select_layer"]
    if options["pretrained"]:
        if in_chans != 3:
            raise ValueError(f"modality {modality!r}: pretrained vision towers take 3-channel "
                             f"input; this configuration produces {in_chans} channels")
        return HFVisionTower(str(options["pretrained"]), image_size=options["image_size"],
                             select_layer=-2 if select_layer is None else select_layer,
                             select_feature=options["select_feature"], modality=modality)
    return TinyViT(in_chans=in_chans, image_size=options["image_size"],
                   patch_size=options["patch_size"], hidden_size=options["hidden_size"],
                   layers=options["layers"], heads=options["heads"],
                   mlp_ratio=options["mlp_ratio"],
                   select_layer=-1 if select_layer is None else select_layer,
                   select_feature=options["select_feature"])


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

"""The pre-norm transformer of the audio and point-cloud encoders (private).

Own attention on ``scaled_dot_product_attention``: no dropout, no eval-mode fast path, so train and
eval modes give identical outputs. (The image, video and depth towers are timm or transformers
models: :mod:`encoders._towers`.)
"""

from __future__ import annotations

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


def select_hidden(outputs: Any, select_layer: int) -> torch.Tensor:
    hidden = getattr(outputs, "hidden_states", None)
    if hidden is None:
        raise ValueError("the pretrained model did not return hidden_states")
    return hidden[select_layer]

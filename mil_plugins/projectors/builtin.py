"""The built-in projector factories, with LLaVA's exact module layout.

Each factory is ``(mm_hidden_size, hidden_size, **options) -> nn.Module`` and is published as an
entry point of the ``mil_plugins.projectors`` group (see pyproject.toml), like a third party's would be.
"""

from __future__ import annotations

from torch import nn


class IdentityMap(nn.Module):
    """LLaVA's ``identity`` projector: features pass through unchanged."""

    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self):
        return {"mm_projector_type": "identity"}


def linear(mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """``linear``: ``nn.Linear(mm_hidden_size, hidden_size)``; state dict ``weight``, ``bias``."""
    return nn.Linear(mm_hidden_size, hidden_size)


def mlp_gelu(mm_hidden_size: int, hidden_size: int, depth: int = 2) -> nn.Module:
    """``mlp{depth}x_gelu``: Linear(mm, h), then (GELU, Linear(h, h)) ``depth - 1`` times.

    State-dict keys are LLaVA's: ``0.weight, 0.bias, 2.weight, 2.bias, ...``.
    """
    if depth < 1:
        raise ValueError(f"mlp{depth}x_gelu: depth must be >= 1")
    modules: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(1, depth):
        modules.append(nn.GELU())
        modules.append(nn.Linear(hidden_size, hidden_size))
    return nn.Sequential(*modules)


def identity(mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """``identity``: only valid when the encoder width already equals the LLM width."""
    if mm_hidden_size != hidden_size:
        raise ValueError(f"identity projector needs mm_hidden_size == hidden_size, "
                         f"got {mm_hidden_size} and {hidden_size}")
    return IdentityMap()

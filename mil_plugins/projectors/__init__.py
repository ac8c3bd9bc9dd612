"""LLaVA-compatible projector registry.

``build_projector("mlp2x_gelu", mm_hidden_size, hidden_size)`` resolves a LLaVA projector name
through the ``projector`` registry. ``mlp{N}x_gelu`` names (any N >= 1) resolve, as in LLaVA's
regex, to the registered ``mlpNx_gelu`` family with ``depth=N``. ``build_vision_projector(config)``
is a drop-in for LLaVA's function of the same name, reading ``mm_projector_type``,
``mm_hidden_size`` and ``hidden_size`` from any config object (or dict).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from mil_plugins.plugins import PROJECTORS
from mil_plugins.registry import PluginError

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")
MLP_FAMILY = "mlpNx_gelu"


def resolve_projector(projector_type: str) -> tuple[Any, dict]:
    """(factory, extra options) for a projector name; raises PluginError listing valid names."""
    match = _MLP_GELU.match(projector_type)
    if match and projector_type not in PROJECTORS:
        return PROJECTORS.get(MLP_FAMILY), {"depth": int(match.group(1))}
    if projector_type not in PROJECTORS:
        raise PluginError(PROJECTORS.unknown_message(projector_type)
                          + f" ({MLP_FAMILY} stands for mlp{{N}}x_gelu, any N >= 1)")
    return PROJECTORS.get(projector_type), {}


def is_known_projector(projector_type: str) -> bool:
    try:
        resolve_projector(projector_type)
    except PluginError:
        return False
    return True


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int,
                    **options: Any) -> nn.Module:
    """Build a projector by LLaVA name (``linear``, ``mlp2x_gelu``, ``identity``, plugins')."""
    factory, extra = resolve_projector(projector_type)
    return factory(int(mm_hidden_size), int(hidden_size), **{**extra, **options})


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def build_vision_projector(config: Any, delay_load: bool = False, **kwargs: Any) -> nn.Module:
    """Drop-in for LLaVA's ``build_vision_projector(config)`` backed by our registry."""
    projector_type = _get(config, "mm_projector_type", "linear")
    mm_hidden_size = _get(config, "mm_hidden_size")
    hidden_size = _get(config, "hidden_size")
    if mm_hidden_size is None or hidden_size is None:
        raise ValueError("build_vision_projector: config needs mm_hidden_size and hidden_size")
    return build_projector(projector_type, mm_hidden_size, hidden_size)


__all__ = ["build_projector", "build_vision_projector", "resolve_projector", "is_known_projector",
           "MLP_FAMILY"]

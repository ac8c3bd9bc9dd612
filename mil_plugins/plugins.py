"""The three plugin registries, one :class:`~mil_plugins.registry.Registry` each.

    MODALITIES  group ``mil_plugins.modalities``  -> ModalityPlugin subclasses
    PROJECTORS  group ``mil_plugins.projectors``  -> projector factories
    METHODS     group ``mil_plugins.methods``     -> Method subclasses
    AGGREGATORS group ``mil_plugins.aggregators`` -> Aggregator subclasses (``mil federate``)

Nothing registers itself on import: built-ins are entry points of our own distribution.
"""

from __future__ import annotations

from typing import Any

from mil_plugins.registry import Registry


def _check_method(name: str, obj: Any) -> None:
    from mil_plugins.kinds.method import check_method_plugin  # torch: only when a plugin loads

    check_method_plugin(name, obj)


def _check_modality(name: str, obj: Any) -> None:
    from mil_plugins.modality import check_modality_plugin  # torch: only when a plugin loads

    check_modality_plugin(name, obj)


def _check_projector(name: str, obj: Any) -> None:
    if not callable(obj):
        raise TypeError(f"a projector entry point must be a factory "
                        f"(mm_hidden_size, hidden_size, **options) -> nn.Module, got {obj!r}")


def _check_aggregator(name: str, obj: Any) -> None:
    from mil_plugins.kinds.aggregator import check_aggregator_plugin  # torch: only when loaded

    check_aggregator_plugin(name, obj)


MODALITIES = Registry("modality", "mil_plugins.modalities", _check_modality)
PROJECTORS = Registry("projector", "mil_plugins.projectors", _check_projector)
METHODS = Registry("method", "mil_plugins.methods", _check_method)
AGGREGATORS = Registry("aggregator", "mil_plugins.aggregators", _check_aggregator)

REGISTRIES: dict[str, Registry] = {"modality": MODALITIES, "projector": PROJECTORS, "method": METHODS,
                                   "aggregator": AGGREGATORS}


def all_records(load: bool = True) -> list[dict]:
    """Every plugin of every kind as plain dicts (what ``mil plugins --json`` prints)."""
    rows = []
    for registry in REGISTRIES.values():
        rows.extend(r.as_dict() for r in registry.records(load=load))
    return rows

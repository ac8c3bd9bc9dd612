"""The aggregator a recipe's ``federated`` section names, from the registry.

Kept apart from :mod:`mil_plugins.federated.aggregators` (the plugin kind, which the registry's
check imports) so that no kind imports the registry back."""

from __future__ import annotations

from mil_plugins.federated.aggregators import Aggregator
from mil_plugins.plugins import AGGREGATORS


def build_aggregator(section: dict) -> Aggregator:
    """The aggregator a recipe's ``federated`` section names, with its options."""
    return AGGREGATORS.get(section["aggregator"])(**(section.get("aggregator_options") or {}))

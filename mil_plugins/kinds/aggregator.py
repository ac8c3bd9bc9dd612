"""The aggregator kind's contract: :class:`Aggregator` (FedAvg unless a subclass says otherwise),
the weighted mean it aggregates with, and the registry's check of an aggregator plugin. The
built-in aggregators are in :mod:`mil_plugins.federated.aggregators`, which re-exports these."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mil_plugins.registry import merge_options

State = dict[str, torch.Tensor]


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """Per name, the ``weights``-weighted mean over the states that hold it (float64 sums)."""
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} client states but {len(weights)} weights")
    if any(w < 0 for w in weights) or not states:
        raise ValueError("aggregation needs at least one client and non-negative weights")
    out: State = {}
    names = list(dict.fromkeys(n for s in states for n in s))
    for name in names:
        holders = [(s[name], w) for s, w in zip(states, weights) if name in s]
        total = sum(w for _, w in holders)
        if total <= 0:
            raise ValueError(f"parameter {name!r}: its clients' weights sum to {total}")
        acc = torch.zeros(holders[0][0].shape, dtype=torch.float64)
        for tensor, w in holders:
            if tensor.shape != acc.shape:
                raise ValueError(f"parameter {name!r}: clients disagree on its shape "
                                 f"({tuple(acc.shape)} vs {tuple(tensor.shape)})")
            acc += tensor.detach().to(torch.float64) * (w / total)
        out[name] = acc.to(holders[0][0].dtype)
    return out


class Aggregator:
    """Base class of an aggregator: FedAvg, unless a subclass says otherwise."""

    name: ClassVar[str] = ""
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        self.options = merge_options("aggregator", self.name, self.default_options, options)

    @property
    def proximal_mu(self) -> float:
        """FedProx's mu: > 0 makes clients add the proximal term."""
        return 0.0

    def aggregate(self, states: list[State], num_samples: list[int],
                  text: set[str]) -> tuple[State, list[State | None]]:
        """``(global, per-client)``; per-client ``None`` means "start from the global"."""
        return weighted_mean(states, [float(n) for n in num_samples]), [None] * len(states)


def check_aggregator_plugin(name: str, obj: Any) -> None:
    """Registry check: an Aggregator subclass registered under its own name."""
    if not (isinstance(obj, type) and issubclass(obj, Aggregator)):
        raise TypeError(f"expected a subclass of mil_plugins.federated.aggregators.Aggregator, "
                        f"got {obj!r}")
    if obj.name != name:
        raise TypeError(f"{obj.__name__}.name is {obj.name!r} but it is registered as {name!r}")

"""Server-side aggregation of the clients' trained parameters: a plugin kind of its own.

An aggregator is an :class:`Aggregator` subclass published in the ``mil_plugins.aggregators``
entry-point group (the built-ins are entry points of our own distribution, so a third party adds
one the same way); a recipe names it in ``federated.aggregator`` with ``aggregator_options``.

:meth:`Aggregator.aggregate` gets, for the clients of one round, their parameter dicts (only the
parameters each client trained; a name may be held by some clients only, e.g. a modality's input
layer), their sample counts and the names of the text-side (LLM / LoRA) parameters. It returns
the new global parameters and, per client, the parameters that client starts its next round from
(``None``: the global ones). ``proximal_mu`` > 0 makes every client add FedProx's proximal term
``mu / 2 * ||w - w_received||^2`` to its loss.

Built-ins: ``fedavg`` (McMahan et al. 2017), ``fedprox`` (Li et al. 2020: FedAvg plus the
proximal term), ``pilot`` (distance-weighted text-side aggregation, Xiong et al. 2025; the formula
is ours, see :class:`PilotAggregation`) and ``local`` (no aggregation: each client alone).
"""

from __future__ import annotations

from typing import Any

import torch

from mil_plugins.kinds.aggregator import (Aggregator, State, check_aggregator_plugin,  # noqa: F401
                                          weighted_mean)


class FedAvg(Aggregator):
    """The sample-weighted mean of every parameter (McMahan et al., 2017)."""

    name = "fedavg"


class FedProx(Aggregator):
    """FedAvg's mean on the server; clients add ``mu / 2 * ||w - w_received||^2`` (Li et al., 2020)."""

    name = "fedprox"
    default_options = {"mu": 0.01}

    def __init__(self, **options: Any):
        super().__init__(**options)
        if float(self.options["mu"]) < 0:
            raise ValueError(f"aggregator 'fedprox': mu must be >= 0, got {self.options['mu']!r}")

    @property
    def proximal_mu(self) -> float:
        return float(self.options["mu"])


class LocalOnly(Aggregator):
    """No aggregation: every client keeps training its own parameters ("each client alone");
    the global model is still the sample-weighted mean, for reference."""

    name = "local"

    def aggregate(self, states, num_samples, text):
        glob, _ = super().aggregate(states, num_samples, text)
        return glob, [dict(s) for s in states]


def distance_weights(vectors: torch.Tensor, num_samples: list[int],
                     temperature: float | None = None) -> tuple[torch.Tensor, float]:
    """Pilot's aggregation weights, ours (the paper's formula is not public)::

        d_ij  = ||theta_i - theta_j||_2                     (text-side parameters, flattened)
        a_ij  = n_j exp(-d_ij / tau) / sum_k n_k exp(-d_ik / tau)

    ``tau`` defaults to the median of the off-diagonal distances (the weights do not depend on
    the parameters' scale; 1 when every distance is 0). Returns ``(a [K, K], tau)``; row ``i``
    holds client ``i``'s weights and sums to 1, and a client weighs itself most at equal sizes."""
    k = vectors.shape[0]
    d = torch.cdist(vectors.double()[None], vectors.double()[None])[0]
    if temperature is None:
        off = d[~torch.eye(k, dtype=torch.bool)]
        positive = off[off > 0]
        temperature = float(positive.median()) if positive.numel() else 1.0
    if temperature <= 0:
        raise ValueError(f"aggregator 'pilot': temperature must be > 0, got {temperature}")
    logits = -d / temperature + torch.log(torch.tensor(num_samples, dtype=torch.float64))[None, :]
    return torch.softmax(logits, dim=1), float(temperature)


class PilotAggregation(Aggregator):
    """Pilot's adaptive aggregation of the text-side parameters (LLM / LoRA): client ``i``'s next
    text parameters are ``sum_j a_ij theta_j`` with :func:`distance_weights`; every other
    parameter (connector, gates, task branches) is FedAvg's sample-weighted mean over the clients
    that hold it. The global text parameters (evaluation, clients not in the round) are FedAvg's.
    ``last_weights`` keeps the matrix of the latest round (logged and tested)."""

    name = "pilot"
    default_options = {"temperature": None}

    def __init__(self, **options: Any):
        super().__init__(**options)
        t = self.options["temperature"]
        if t is not None and float(t) <= 0:
            raise ValueError(f"aggregator 'pilot': temperature must be > 0 or null, got {t!r}")
        self.last_weights: torch.Tensor | None = None
        self.last_temperature: float | None = None

    def aggregate(self, states, num_samples, text):
        glob, _ = super().aggregate(states, num_samples, text)
        shared_text = sorted(n for n in text if all(n in s for s in states))
        if len(states) < 2 or not shared_text:
            return glob, [None] * len(states)
        vectors = torch.stack([torch.cat([s[n].detach().double().flatten() for n in shared_text])
                               for s in states])
        t = self.options["temperature"]
        alpha, tau = distance_weights(vectors, list(num_samples), None if t is None else float(t))
        self.last_weights, self.last_temperature = alpha, tau
        personal: list[State | None] = []
        for i in range(len(states)):
            mixed = {}
            for n in shared_text:
                acc = sum(alpha[i, j] * states[j][n].detach().double() for j in range(len(states)))
                mixed[n] = acc.to(states[i][n].dtype)
            personal.append(mixed)
        return glob, personal

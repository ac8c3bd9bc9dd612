"""Continual-learning metrics over the accuracy matrix.

``R[t][i]`` is the score on stage ``i``'s test split after training stage ``t`` (0-based here;
the formulas in the docstrings use the 1-based notation of the papers, ``a_{t,i}``, with ``T``
the number of stages trained, i.e. ``len(R)``). Entries may be ``None`` (not evaluated -- usually
the upper triangle ``i > t``); NaN counts as ``None`` too. Rows may be ragged (row ``t`` may stop
at column ``t``). Scores keep the scale they are given in ([0, 100] or [0, 1]); nothing here
rescales.

Missing entries never raise: a term of a sum that needs a missing entry is left out and the mean
is taken over the terms that are present; a metric with no term left is ``None``. With a complete
lower triangle (the normal case) every formula below is exactly the textbook one.

Definitions follow the method cards, section "7. Metrics" (GEM / A-GEM / iCaRL / MCITlib):

    final_average_accuracy  (= MFN)       A_T = 1/T Σ_{i≤T} a_{T,i}
    average_incremental_accuracy (= MAA)  1/T Σ_{t≤T} A_t,  A_t = 1/t Σ_{i≤t} a_{t,i}
    forgetting (Chaudhry et al. 2018)     1/(T−1) Σ_{i<T} f_i,  f_i = max_{i≤l<T} a_{l,i} − a_{T,i}
    backward_transfer (BWT)               1/(T−1) Σ_{i<T} (a_{T,i} − a_{i,i})
    forward_transfer (FWT)                1/(T−1) Σ_{i≥2} (a_{i−1,i} − b_i),  b = untrained baseline
    MFT                                   1/T Σ_{i≤T} a_{i,i}

Forgetting, BWT and FWT are ``None`` for T = 1.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = [
    "final_average_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "per_stage_forgetting",
    "backward_transfer",
    "forward_transfer",
    "mft",
    "mfn",
    "maa",
    "stage_average_accuracy",
    "compute_all",
    "METRIC_KEYS",
]

Matrix = Sequence[Sequence[Any]]

#: the scalar keys :func:`compute_all` returns (besides ``per_stage_forgetting``)
METRIC_KEYS = (
    "final_average_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "backward_transfer",
    "forward_transfer",
    "MFT",
    "MFN",
    "MAA",
)


def _val(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _get(R: Matrix, t: int, i: int) -> float | None:
    """``R[t][i]`` as a float, or None if missing / out of range / NaN."""
    if t < 0 or t >= len(R) or i < 0:
        return None
    row = R[t]
    if row is None or i >= len(row):
        return None
    return _val(row[i])


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def stage_average_accuracy(R: Matrix, t: int) -> float | None:
    """A_t = mean_{i≤t} R[t][i] (0-based ``t``): the average over the stages seen so far."""
    return _mean([_get(R, t, i) for i in range(t + 1)])


def final_average_accuracy(R: Matrix) -> float | None:
    """A_T = 1/T Σ_{i≤T} a_{T,i}: the mean of the last row over the stages it covers.

    Only seen stages (columns ``i ≤ T``) count, so a zero-shot score on a future stage of a run
    that stopped early does not enter; ``None`` entries are skipped.
    """
    if not R:
        return None
    return stage_average_accuracy(R, len(R) - 1)


def average_incremental_accuracy(R: Matrix) -> float | None:
    """1/T Σ_{t≤T} A_t with A_t = 1/t Σ_{i≤t} a_{t,i} (iCaRL-style; MCITlib's MAA).

    Rows with no entry at all are left out of the outer mean.
    """
    return _mean([stage_average_accuracy(R, t) for t in range(len(R))])


def per_stage_forgetting(R: Matrix) -> list[float | None]:
    """f_i = max_{i≤l<T} a_{l,i} − a_{T,i} for every stage ``i`` (Chaudhry et al. 2018).

    One entry per trained stage (``len(R)``); the last stage's entry is ``None`` (it cannot have
    been forgotten yet), as is any stage whose final score or earlier scores are missing.
    The max runs over the rows from the one that trained stage ``i`` up to the one before the
    last (zero-shot scores before stage ``i`` was trained are not counted).
    """
    T = len(R)
    out: list[float | None] = []
    for i in range(T):
        final = _get(R, T - 1, i)
        earlier = [v for v in (_get(R, l, i) for l in range(i, T - 1)) if v is not None]
        out.append(max(earlier) - final if (i < T - 1 and final is not None and earlier) else None)
    return out


def forgetting(R: Matrix) -> float | None:
    """F_T = 1/(T−1) Σ_{i<T} f_i, f_i = max_{i≤l<T} a_{l,i} − a_{T,i}. ``None`` for T = 1.

    Positive means forgotten. Stages whose f_i is undefined (missing entries) are left out.
    """
    if len(R) < 2:
        return None
    return _mean(per_stage_forgetting(R)[:-1])


def backward_transfer(R: Matrix) -> float | None:
    """BWT = 1/(T−1) Σ_{i<T} (a_{T,i} − a_{i,i}) (GEM; MCITlib). ``None`` for T = 1.

    Negative means forgotten. Terms with a missing entry are left out.
    """
    T = len(R)
    if T < 2:
        return None
    terms = []
    for i in range(T - 1):
        final, just_trained = _get(R, T - 1, i), _get(R, i, i)
        if final is not None and just_trained is not None:
            terms.append(final - just_trained)
    return _mean(terms)


def forward_transfer(R: Matrix, baseline: Sequence[Any] | None = None) -> float | None:
    """FWT = 1/(T−1) Σ_{i≥2} (a_{i−1,i} − b_i) (GEM), b_i = the untrained model's score on stage i.

    Needs the upper diagonal ``R[i-1][i]`` (stage ``i`` evaluated *before* it was trained) and
    ``baseline``; ``None`` when either was not measured (no baseline, T = 1, or no term with both
    entries present). Terms with a missing entry are left out.
    """
    T = len(R)
    if T < 2 or baseline is None:
        return None
    terms = []
    for i in range(1, T):
        before = _get(R, i - 1, i)
        b = _val(baseline[i]) if i < len(baseline) else None
        if before is not None and b is not None:
            terms.append(before - b)
    return _mean(terms)


def mft(R: Matrix) -> float | None:
    """MFT (MCITlib, mean fine-tune accuracy) = 1/T Σ_i a_{i,i}: each stage right after training it."""
    return _mean([_get(R, i, i) for i in range(len(R))])


def mfn(R: Matrix) -> float | None:
    """MFN (MCITlib, mean final accuracy) = 1/T Σ_i a_{T,i}; equal to :func:`final_average_accuracy`."""
    return final_average_accuracy(R)


def maa(R: Matrix) -> float | None:
    """MAA (MCITlib) = 1/T Σ_t (1/t) Σ_{i≤t} a_{t,i}; equal to :func:`average_incremental_accuracy`."""
    return average_incremental_accuracy(R)


def compute_all(R: Matrix, baseline: Sequence[Any] | None = None) -> dict[str, Any]:
    """Every metric of this module as a dict.

    Keys: ``final_average_accuracy``, ``average_incremental_accuracy``, ``forgetting``,
    ``backward_transfer``, ``forward_transfer``, ``MFT``, ``MFN``, ``MAA`` (float or ``None``)
    and ``per_stage_forgetting`` (list, one entry per trained stage, see :func:`per_stage_forgetting`).
    """
    R = [list(row) if row is not None else [] for row in R]
    return {
        "final_average_accuracy": final_average_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting": forgetting(R),
        "backward_transfer": backward_transfer(R),
        "forward_transfer": forward_transfer(R, baseline),
        "MFT": mft(R),
        "MFN": mfn(R),
        "MAA": maa(R),
        "per_stage_forgetting": per_stage_forgetting(R),
    }

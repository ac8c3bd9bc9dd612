"""Statistics for results that are worth comparing: seeds, intervals, paired differences, and the
standard error a test split of a given size allows.

* :func:`summarize` -- mean, sample standard deviation and the 95% t-interval of the mean of
  per-seed values.
* :func:`paired` -- the same for per-seed differences between two methods run with the same seeds
  (the seed fixes initialisation and data order, so a paired difference removes their shared
  part of the variance).
* :func:`task_standard_error` -- the standard error of one task's score from its test samples:
  binomial for per-sample 0/1 metrics (exact match), bootstrap over samples for corpus-level
  metrics (BLEU-4, CIDEr-D) and VQA accuracy.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

#: bootstrap resamples for corpus-level metrics (fixed seed: the same rows give the same SE)
BOOTSTRAP = 200


def t_quantile(df: int, q: float = 0.975) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def summarize(values: Sequence[float | None]) -> dict:
    """``{"n", "values", "mean", "std", "ci95": [lo, hi]}`` over the non-missing ``values``.

    ``std`` is the sample standard deviation (ddof 1); the interval is the mean's 95% Student-t
    interval. With one value, ``std`` and the interval are ``None``."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    out: dict = {"n": len(xs), "values": xs, "mean": None, "std": None, "ci95": None}
    if not xs:
        return out
    mean = float(np.mean(xs))
    out["mean"] = mean
    if len(xs) > 1:
        std = float(np.std(xs, ddof=1))
        half = t_quantile(len(xs) - 1) * std / math.sqrt(len(xs))
        out.update(std=std, ci95=[mean - half, mean + half])
    return out


def paired(a: Sequence[float | None], b: Sequence[float | None]) -> dict:
    """:func:`summarize` of ``a[i] - b[i]`` over the pairs where both exist."""
    return summarize([x - y for x, y in zip(a, b) if x is not None and y is not None])


def binomial_se(p: float, n: int) -> float:
    """Standard error (same unit as ``p``, a fraction) of a proportion from ``n`` samples."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else float("nan")


def task_standard_error(metric: str, preds: Sequence[str], refs: Sequence,
                        score: Callable[[str, Sequence[str], Sequence], float], seed: int = 0) -> float:
    """Standard error (in score points) of ``score(metric, preds, refs)`` over its samples."""
    n = len(preds)
    if n < 2:
        return float("nan")
    if metric == "exact_match":
        return 100.0 * binomial_se(score(metric, preds, refs) / 100.0, n)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(BOOTSTRAP):
        idx = rng.integers(0, n, n)
        values.append(score(metric, [preds[i] for i in idx], [refs[i] for i in idx]))
    return float(np.std(values, ddof=1))


def mean_standard_error(ses: Sequence[float]) -> float:
    """SE of the mean of ``k`` independently estimated scores: ``sqrt(sum se^2) / k``."""
    ses = [s for s in ses if s is not None and not math.isnan(s)]
    return math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else float("nan")

"""The two plots of the run report (:mod:`mil_plugins.report`): ``accuracy_matrix.png`` and
``accuracy_curves.png``, drawn with matplotlib's Agg canvas directly (no pyplot, no global
backend change)."""

from __future__ import annotations

import io
from typing import Any, Mapping

from mil_plugins.metrics import stage_average_accuracy
from mil_plugins.report_tables import _square, _unit_scale, _values


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _plot_matrix(payload: Mapping[str, Any]) -> bytes:
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = payload["stages"]
    n = len(stages)
    R = _square(payload["accuracy_matrix"], n)
    T = len(R)
    vals = _values(R)
    unit = _unit_scale(vals)
    vmax = 1.0 if unit else max([100.0] + vals)
    digits = 2 if unit else 1

    data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in R] or [[np.nan] * n],
                                         dtype=float))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")

    fig = Figure(figsize=(max(4.0, 1.1 * n + 2.5), max(2.5, 0.8 * max(T, 1) + 1.8)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    for i in range(T):
        for j in range(n):
            v = R[i][j]
            if v is None:
                continue
            dark = (v / vmax) < 0.6 if vmax else True
            ax.text(j, i, f"{v:.{digits}f}", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    ax.set_xticks(range(n))
    ax.set_xticklabels(stages, rotation=30, ha="right")
    ax.set_yticks(range(max(T, 1)))
    ax.set_yticklabels([f"after {s}" for s in stages[:T]] or [""])
    ax.set_xlabel("evaluated on")
    ax.set_title(f"Accuracy matrix: {payload.get('method') or ''}".rstrip(": "))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _png(fig)


def _plot_curves(payload: Mapping[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = payload["stages"]
    n = len(stages)
    R = _square(payload["accuracy_matrix"], n)
    T = len(R)

    fig = Figure(figsize=(max(5.0, 1.0 * T + 3.5), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for j in range(min(n, T)):
        pts = [(i, R[i][j]) for i in range(j, T) if R[i][j] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=stages[j])
    avg = [(t, stage_average_accuracy(R, t)) for t in range(T)]
    avg = [(t, a) for t, a in avg if a is not None]
    if avg:
        xs, ys = zip(*avg)
        ax.plot(xs, ys, "k--", marker="s", linewidth=2, label="average (seen stages)")
    ax.set_xticks(range(max(T, 1)))
    ax.set_xticklabels(stages[:T] or [""], rotation=30, ha="right")
    ax.set_xlim(-0.3, max(T - 1, 0) + 0.3)
    ax.set_xlabel("after stage")
    ax.set_ylabel("score")
    ax.set_title(f"Scores over training: {payload.get('method') or ''}".rstrip(": "))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _png(fig)

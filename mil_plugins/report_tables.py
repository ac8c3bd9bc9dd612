"""The number helpers of the run report (:mod:`mil_plugins.report`): reading and squaring the
accuracy matrix, formatting numbers, and the markdown table."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _square(R: Sequence[Sequence[Any]], n: int) -> list[list[float | None]]:
    """R padded with None to ``len(R)`` rows x ``n`` columns, NaN -> None."""
    out = []
    for row in R:
        row = list(row) if row is not None else []
        out.append([_num(row[j]) if j < len(row) else None for j in range(n)])
    return out


def _values(R: list[list[float | None]], extra: Sequence[Any] = ()) -> list[float]:
    vals = [v for row in R for v in row if v is not None]
    vals += [v for v in (_num(x) for x in extra) if v is not None]
    return vals


def _unit_scale(vals: Sequence[float]) -> bool:
    """True when every score lies in [0, 1] (scores given as fractions, not percentages)."""
    return bool(vals) and all(-1.0 <= v <= 1.0 for v in vals)


def _fmt(x: Any, digits: int) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:.{digits}f}"


def _fmt_signed(x: Any, digits: int) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:+.{digits}f}"


def _fmt_int(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{int(round(v)):,}"


def _human_count(x: float | None) -> str:
    if x is None:
        return "—"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{int(x)}"


def _fmt_seconds(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "—"
    if v < 60:
        return f"{v:.1f} s"
    m, s = divmod(int(round(v)), 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s"


def _md(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> list[str]:
    sep = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep[a] for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _padded(xs: Sequence[Any] | None, n: int) -> list[Any]:
    xs = list(xs) if xs is not None else []
    return [xs[i] if i < len(xs) else None for i in range(n)]


def _validate(result: Mapping[str, Any]) -> tuple[list[str], list[str], list[list[Any]]]:
    for key in ("stages", "accuracy_matrix"):
        if key not in result:
            raise ValueError(f"result has no {key!r} (keys: {sorted(result)})")
    stages = [str(s) for s in result["stages"]]
    n = len(stages)
    modalities = list(result.get("modalities") or [None] * n)
    if len(modalities) != n:
        raise ValueError(f"{n} stages but {len(modalities)} modalities")
    R = [list(row) if row is not None else [] for row in result["accuracy_matrix"]]
    if len(R) > n:
        raise ValueError(f"accuracy_matrix has {len(R)} rows but there are only {n} stages")
    for i, row in enumerate(R):
        if len(row) > n:
            raise ValueError(f"accuracy_matrix row {i} has {len(row)} entries but there are {n} stages")
    for key in ("baseline", "trainable_parameters", "seconds"):
        v = result.get(key)
        if v is not None and len(v) > n:
            raise ValueError(f"{key} has {len(v)} entries but there are {n} stages")
    return stages, [str(m) if m is not None else "" for m in modalities], R

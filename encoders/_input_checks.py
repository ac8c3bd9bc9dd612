"""Input checks of the built-in readers that the decoders do not make (private).

Each returns a reason (``str``) when the input cannot be used, else ``None``; the readers raise
:class:`~mil_plugins.modality.ModalityInputError` with it, naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def nonfinite_pixels_problem(img) -> str | None:
    """Float (mode ``F``) or 32-bit integer images with NaN / infinite pixels."""
    if img.mode not in ("F", "I"):
        return None
    arr = np.asarray(img)
    if not np.issubdtype(arr.dtype, np.floating):
        return None
    bad = int(arr.size - np.isfinite(arr).sum())
    if bad:
        return f"{bad} of {arr.size} pixels are NaN or infinite"
    return None


def same_place_problem(xyz: np.ndarray) -> str | None:
    """All points (after any down-sampling) at one place, up to float rounding."""
    extent = float(np.ptp(xyz, axis=0).max()) if len(xyz) else 0.0
    size = float(np.abs(xyz).max()) if len(xyz) else 0.0
    if extent <= 1e-9 * max(1.0, size):
        return f"all {len(xyz)} points are at the same place"
    return None


def ascii_ply_vertex_problem(path: Path, body_start: int, skip: int, count: int,
                             num_props: int | None) -> str | None:
    """The ``count`` vertex lines of an ASCII PLY (after ``skip`` lines of earlier elements):
    each must hold ``num_props`` numbers (``None``: a list property, any count >= 1)."""
    with open(path, "rb") as f:
        f.seek(body_start)
        seen = 0
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            seen += 1
            if seen <= skip:
                continue
            if seen > skip + count:
                break
            tokens = raw.split()
            vertex = seen - skip - 1
            if num_props is not None and len(tokens) < num_props:
                return (f"vertex {vertex} (data line {lineno}) has {len(tokens)} values, the "
                        f"header declares {num_props} properties")
            for tok in tokens[:num_props]:
                try:
                    float(tok)
                except ValueError:
                    text = tok[:20].decode("utf-8", "replace")
                    return f"vertex {vertex} (data line {lineno}): {text!r} is not a number"
    return None

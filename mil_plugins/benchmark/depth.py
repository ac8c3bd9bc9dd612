"""Depth renderer: a flat object in front of a wall, saved as a 16-bit PNG of millimetres.

Scene attributes: ``shape`` (the object's silhouette: circle/square/triangle), ``distance`` (near:
650-1000 mm; far: 1900-2500 mm) and ``side`` (left/right half). The wall stands at 3.6-4.4 m with a
vertical slope (the lower rows are nearer, like a floor receding), so the half that holds the object
is always the nearer half. A near object also looks larger (perspective), a second cue for distance.

Like a structured-light sensor: noise grows with the square of the depth, a 1-3 px "shadow" band
beside the object's right edge has no reading, and ~0.5% of pixels drop out; pixels with no reading
are 0. Files are single-channel uint16 PNGs (Pillow mode ``I;16``), values in millimetres. Encoders
should scale by a fixed constant (e.g. / 5000 mm) rather than per-image min-max, which would erase
absolute distance (the size cue survives either way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image

from .image import shape_mask, side_center

EXT = ".png"
SIZE = 64
NEAR_MM = (650.0, 1000.0)
FAR_MM = (1900.0, 2500.0)
WALL_MM = (3600.0, 4400.0)
DEPTH_SCALE_MM = 5000.0      # suggested fixed normalisation constant for encoders
NOISE_K = 1.5e-6             # sigma(d) = NOISE_K * d^2 (mm)


def render_array(attrs: Mapping[str, str], rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """uint16 [size, size], millimetres, 0 = no reading."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
    wall = rng.uniform(*WALL_MM)
    slope = rng.uniform(200, 700)
    depth = wall - slope * yy + rng.uniform(-40, 40) * xx

    near = attrs["distance"] == "near"
    r = rng.uniform(0.15, 0.18) * size if near else rng.uniform(0.09, 0.11) * size
    cx = side_center(attrs["side"], rng, size, r * 1.3)
    cy = float(rng.uniform(r * 1.6, size - r * 1.6))
    angle = float(rng.uniform(-0.25, 0.25))
    obj = shape_mask(attrs["shape"], cx, cy, r, angle, size) >= 0.5
    d_obj = rng.uniform(*(NEAR_MM if near else FAR_MM))
    tilt = rng.uniform(-60, 60, 2)
    depth = np.where(obj, d_obj + tilt[0] * xx + tilt[1] * yy, depth)

    depth = depth + rng.normal(0, 1, depth.shape) * NOISE_K * depth ** 2
    valid = np.ones_like(obj)
    shift = 3 if near else 1
    shadow = np.zeros_like(obj)
    shadow[:, shift:] = obj[:, :-shift]
    for k in range(1, shift):
        shadow[:, k:] |= obj[:, :-k]
    valid &= ~(shadow & ~obj)                       # sensor shadow to the right of the object
    valid &= rng.random(obj.shape) >= 0.005         # random dropouts
    out = np.where(valid, np.rint(depth), 0)
    return np.clip(out, 0, 65535).astype(np.uint16)


def read_depth(path: str | Path) -> np.ndarray:
    """Read a depth PNG as uint16 millimetres [H, W]."""
    with Image.open(path) as im:
        return np.asarray(im).astype(np.uint16)


def render(attrs: Mapping[str, str], rng: np.random.Generator, path: Path) -> None:
    Image.fromarray(render_array(attrs, rng)).save(path, format="PNG")

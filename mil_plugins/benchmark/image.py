"""Image renderer: one big filled shape on a dark, noisy background, saved as an RGB PNG.

Scene attributes: ``shape`` (circle/square/triangle), ``color`` (red/green/blue), ``side``
(left/right: which half holds the shape's centre). Shapes of one size have about the same area, so
size never gives the shape away; size, position within the half, rotation, colour tone and
background brightness are jittered.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw

EXT = ".png"
SIZE = 64                     # image side in pixels
SUPERSAMPLE = 4               # shapes are drawn 4x larger and box-filtered down (anti-aliasing)

#: base RGB of each colour; every sample jitters it a little.
RGB = {"red": (225, 35, 35), "green": (35, 205, 45), "blue": (40, 70, 235)}


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` centred at (cx, cy), float32 [size, size].

    ``r`` is the radius of the circle; square and triangle are scaled to the circle's area. ``angle``
    (radians) rotates square and triangle.
    """
    s = SUPERSAMPLE
    img = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(img)
    cxs, cys = cx * s, cy * s
    if shape == "circle":
        rs = r * s
        draw.ellipse([cxs - rs, cys - rs, cxs + rs, cys + rs], fill=255)
    else:
        if shape == "square":
            half = r * math.sqrt(math.pi) / 2          # equal area: (2h)^2 = pi r^2
            rad = half * math.sqrt(2)
            base = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        elif shape == "triangle":
            rad = r * math.sqrt(math.pi / (3 * math.sqrt(3) / 4))   # equilateral, equal area
            base = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]  # apex up
        else:
            raise ValueError(f"unknown shape {shape!r}")
        pts = [(cxs + rad * s * math.cos(b + angle), cys + rad * s * math.sin(b + angle)) for b in base]
        draw.polygon(pts, fill=255)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def side_center(side: str, rng: np.random.Generator, size: int, margin: float) -> float:
    """A random x-centre well inside the ``side`` half of a ``size``-wide frame."""
    lo, hi = (margin, size / 2 - size / 10) if side == "left" else (size / 2 + size / 10, size - margin)
    return float(rng.uniform(lo, max(lo, hi)))


def jitter_color(color: str, rng: np.random.Generator, amount: int = 20) -> np.ndarray:
    base = np.asarray(RGB[color], dtype=np.float32)
    return np.clip(base + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def background(rng: np.random.Generator, shape: tuple[int, ...], noise: float = 6.0) -> np.ndarray:
    """Dark grey background (level 20-55) with a faint gradient and Gaussian noise."""
    h, w = shape[:2]
    level = rng.uniform(20, 55)
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None, None] * rng.uniform(-8, 8)
    bg = np.full((h, w, 3), level, dtype=np.float32) + gy
    return bg + rng.normal(0, noise, (h, w, 3)).astype(np.float32)


def render_array(attrs: Mapping[str, str], rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    r = rng.uniform(0.15, 0.19) * size
    cx = side_center(attrs["side"], rng, size, r * 1.3)
    cy = float(rng.uniform(r * 1.6, size - r * 1.6))
    angle = float(rng.uniform(-0.25, 0.25))
    alpha = shape_mask(attrs["shape"], cx, cy, r, angle, size)[..., None]
    img = background(rng, (size, size)) * (1 - alpha) + jitter_color(attrs["color"], rng) * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(attrs: Mapping[str, str], rng: np.random.Generator, path: Path) -> None:
    Image.fromarray(render_array(attrs, rng)).save(path, format="PNG")

"""Point-cloud renderer: points on the surface of a coloured 3-D shape, saved as a binary PLY.

Scene attributes: ``shape3d`` (sphere/cube/cylinder/cone) and ``color`` (red/green/blue, stored as
per-point RGB). 512 points sampled uniformly by area on the surface of a shape about 2 units across,
with its axis along +z (cone apex up). Jitter: scale 0.8-1.2, +-5% per axis, any rotation about z,
a tilt of up to ~9 degrees, an offset of up to 0.1, Gaussian point noise (1% of the size), colour
tone and per-point colour noise. Written with ``open3d.io.write_point_cloud`` (xyz as float64, rgb).

The colour task needs an encoder that reads the colours (e.g. PointNet on xyz+rgb); an xyz-only
encoder can still learn ``shape3d``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

EXT = ".ply"
NUM_POINTS = 512
RGB = {"red": (0.88, 0.14, 0.14), "green": (0.14, 0.80, 0.18), "blue": (0.16, 0.27, 0.92)}


def _sphere(n, rng):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _cube(n, rng, half=0.85):
    face = rng.integers(0, 6, n)
    uv = rng.uniform(-half, half, (n, 2))
    pts = np.empty((n, 3))
    axis, sign = face // 2, np.where(face % 2 == 0, -1.0, 1.0)
    for a in range(3):
        others = [b for b in range(3) if b != a]
        m = axis == a
        pts[m, a] = sign[m] * half
        pts[m, others[0]], pts[m, others[1]] = uv[m, 0], uv[m, 1]
    return pts


def _disc(n, rng, radius):
    rho = radius * np.sqrt(rng.uniform(0, 1, n))
    th = rng.uniform(0, 2 * np.pi, n)
    return rho * np.cos(th), rho * np.sin(th)


def _cylinder(n, rng, radius=0.8, half_h=0.9):
    side, cap = 2 * np.pi * radius * 2 * half_h, 2 * np.pi * radius ** 2
    on_side = rng.uniform(0, side + cap, n) < side
    pts = np.empty((n, 3))
    k = int(on_side.sum())
    th = rng.uniform(0, 2 * np.pi, k)
    pts[on_side] = np.stack([radius * np.cos(th), radius * np.sin(th), rng.uniform(-half_h, half_h, k)], 1)
    m = ~on_side
    x, y = _disc(n - k, rng, radius)
    pts[m] = np.stack([x, y, np.where(rng.uniform(size=n - k) < 0.5, -half_h, half_h)], 1)
    return pts


def _cone(n, rng, radius=1.0, height=2.0):
    lateral, base = np.pi * radius * math.hypot(radius, height), np.pi * radius ** 2
    on_side = rng.uniform(0, lateral + base, n) < lateral
    pts = np.empty((n, 3))
    k = int(on_side.sum())
    t = np.sqrt(rng.uniform(0, 1, k))          # distance from the apex, uniform by area
    th = rng.uniform(0, 2 * np.pi, k)
    pts[on_side] = np.stack([t * radius * np.cos(th), t * radius * np.sin(th), height * (1 - t)], 1)
    x, y = _disc(n - k, rng, radius)
    pts[~on_side] = np.stack([x, y, np.zeros(n - k)], 1)
    pts[:, 2] -= height / 2                    # bounding box centred on the origin
    return pts


SAMPLERS = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone}


def _rot_z(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _rot_x(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def render_points(attrs: Mapping[str, str], rng: np.random.Generator,
                  n: int = NUM_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(xyz float64 [n, 3], rgb float64 [n, 3] in [0, 1])."""
    pts = SAMPLERS[attrs["shape3d"]](n, rng)
    scale = rng.uniform(0.8, 1.2)
    pts = pts * scale * rng.uniform(0.95, 1.05, 3)
    rot = _rot_z(rng.uniform(0, 2 * np.pi)) @ _rot_x(rng.uniform(-0.15, 0.15))
    pts = pts @ rot.T + rng.uniform(-0.1, 0.1, 3)
    pts = pts + rng.normal(0, 0.01 * scale, pts.shape)
    base = np.asarray(RGB[attrs["color"]]) + rng.uniform(-0.08, 0.08, 3)
    rgb = np.clip(base + rng.normal(0, 0.03, (n, 3)), 0, 1)
    return pts, rgb


def read_points(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a PLY with open3d: (xyz [N, 3], rgb [N, 3] or empty [N, 0])."""
    import open3d as o3d

    pcd = o3d.io.read_point_cloud(str(path))
    xyz = np.asarray(pcd.points)
    rgb = np.asarray(pcd.colors) if pcd.has_colors() else np.zeros((len(xyz), 0))
    return xyz, rgb


def render(attrs: Mapping[str, str], rng: np.random.Generator, path: Path) -> None:
    import open3d as o3d

    xyz, rgb = render_points(attrs, rng)
    pcd = o3d.geometry.PointCloud()
    pcd.points = o3d.utility.Vector3dVector(xyz)
    pcd.colors = o3d.utility.Vector3dVector(rgb)
    if not o3d.io.write_point_cloud(str(path), pcd, write_ascii=False):
        raise OSError(f"open3d could not write {path}")

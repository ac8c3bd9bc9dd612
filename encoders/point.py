"""Point-cloud modality: PLY / PCD / XYZ / PTS (open3d) or ``.npy`` -> ``[N, 3|6]`` -> tokens.

Preprocessing:

1. read with ``open3d.io.read_point_cloud`` (NaN / inf points are *kept*, so that they can be
   reported) or ``np.load`` for ``.npy`` arrays ``[N, 3]`` (xyz) / ``[N, 6]`` (xyz + rgb, rgb in
   ``[0, 1]``, or ``[0, 255]`` when any value exceeds 1). PLY headers are checked against the file
   size (open3d returns garbage for a cut PLY instead of failing).
2. errors: no point, a single point, any NaN / infinite coordinate (the count is given), all points
   at the same place, ``use_colors: true`` on a file without colours.
3. optional voxel down-sampling (``voxel_size``, ``null`` = off; open3d ``voxel_down_sample``).
4. centre on the mean and scale into the unit sphere (max distance to the centre = 1), over all
   points (as Point-BERT's ``pc_normalize``).
5. farthest-point sampling of ``num_points`` points, deterministic: it starts at point 0 of the
   file; the selected points are kept in file order (open3d's ``farthest_point_down_sample``, or
   the same selection in numpy without open3d). A cloud with at most ``num_points`` points is
   sampled *with repetition*: all its points in file order, repeated cyclically up to
   ``num_points``.
6. output float32 ``[num_points, 6]`` (xyz, rgb in [0, 1]) with ``use_colors: true`` (the
   default: colour is information a question may ask about; a file without colours is then an
   error), or ``[num_points, 3]`` with ``use_colors: false`` (xyz-only data such as ModelNet).

Encoder (Point-BERT / ULIP style, tiny random-init from options): farthest-point sampling of
``num_groups`` centres (start at index 0), the ``group_size`` nearest neighbours of each centre,
coordinates relative to the centre (colours as they are), a mini-PointNet patch embedding (shared
MLP, max-pool, concatenated with the group's global feature, shared MLP, max-pool), a CLS token, a
positional embedding from the centre coordinates (an MLP), ``layers`` transformer blocks. Defaults:
512 points with colours, 16 groups of 32 -> 16 tokens of width 64. The PointNet uses LayerNorm
where Point-BERT has BatchNorm, so the encoder is identical in train and eval mode.

``pretrained``: no point-cloud encoder exists in transformers, so it is a ``.safetensors`` file (or
a directory holding ``model.safetensors``) with *this* encoder's state dict (our own key layout,
written by :func:`save_encoder`), loaded strictly: the architecture options must match those it was
saved with.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from encoders._common import (check_file, check_positive_int, describe_exc, finish_encoder,
                              require, seeded, check_choice)
from encoders._input_checks import ascii_ply_vertex_problem, same_place_problem
from encoders._point_sampling import (farthest_point_order,  # noqa: F401
                                     farthest_point_sample, sample_indices)
from encoders._transformer import Transformer, init_weights
from mil_plugins.modality import (ModalityEncoder, ModalityInputError, ModalityPlugin,
                                  load_encoder_weights)

OPEN3D_EXTENSIONS = (".ply", ".pcd", ".xyz", ".xyzn", ".xyzrgb", ".pts")
POINT_EXTENSIONS = OPEN3D_EXTENSIONS + (".npy",)

_PLY_SIZES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2,
              "uint16": 2, "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4,
              "double": 8, "float64": 8}


def ply_problem(path: Path) -> str | None:
    """A reason why a PLY file is malformed or truncated, or ``None`` if its header adds up."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.startswith(b"ply"):
        return "not a PLY file (no 'ply' magic number)"
    end = head.find(b"end_header")
    if end < 0:
        return "PLY header has no end_header (truncated or corrupt)"
    body_start = head.find(b"\n", end) + 1 or len(head)
    fmt, elements = None, []
    for line in head[:end].decode("ascii", "replace").splitlines():
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "format" and len(tok) > 1:
            fmt = tok[1]
        elif tok[0] == "element" and len(tok) > 2 and tok[2].isdigit():
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property" and elements and len(tok) > 2:
            elements[-1][2].append(None if tok[1] == "list" else _PLY_SIZES.get(tok[1]))
    vertex = next((e for e in elements if e[0] == "vertex"), None)
    if vertex is None:
        return "PLY header declares no vertex element"
    if fmt == "ascii":
        needed = 0
        for name, count, _ in elements:
            needed += count
            if name == "vertex":
                break
        with open(path, "rb") as f:
            f.seek(body_start)
            lines = sum(1 for line in f if line.strip())
        if lines < needed:
            return (f"truncated PLY: the header declares {vertex[1]} vertices but the file holds "
                    f"only {lines} data lines")
        props = vertex[2]
        return ascii_ply_vertex_problem(path, body_start, needed - vertex[1], vertex[1],
                                        None if any(p is None for p in props) else len(props))
    elif fmt in ("binary_little_endian", "binary_big_endian"):
        needed = 0
        for name, count, props in elements:
            if any(p is None for p in props):
                return None  # variable-size element before the vertices: cannot check
            needed += count * sum(props)
            if name == "vertex":
                break
        if size - body_start < needed:
            return (f"truncated PLY: the header declares {vertex[1]} vertices "
                    f"({needed} bytes) but only {size - body_start} bytes of data follow")
    else:
        return f"PLY header has an unknown format {fmt!r}"
    return None


class MiniPointNet(nn.Module):
    """Point-BERT's group encoder, LayerNorm in place of BatchNorm: ``[B, G, K, C] -> [B, G, D]``.

    Relative xyz goes through ``Linear + LayerNorm``; colours (``C == 6``) through their own
    ``Linear``, added after the norm so that they do not drown the (small, ~0.1-0.3) relative
    coordinates. The normalisation matters for a frozen random encoder: without it the first layer
    stays in GELU's linear range and local shape is poorly encoded.
    """

    def __init__(self, in_dim: int, out_dim: int, width: int = 64):
        super().__init__()
        self.xyz = nn.Sequential(nn.Linear(3, width), nn.LayerNorm(width))
        self.color = nn.Linear(in_dim - 3, width) if in_dim > 3 else None
        self.first = nn.Sequential(nn.GELU(), nn.Linear(width, 2 * width))
        self.second = nn.Sequential(nn.Linear(4 * width, 2 * width), nn.LayerNorm(2 * width),
                                    nn.GELU(), nn.Linear(2 * width, out_dim))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        h = self.xyz(groups[..., :3])
        if self.color is not None:
            h = h + self.color(groups[..., 3:])
        f = self.first(h)
        g = f.max(2, keepdim=True).values.expand_as(f)
        return self.second(torch.cat([g, f], -1)).max(2).values


class PointEncoder(ModalityEncoder):
    """``[B, N, 3 | 6] -> [B, num_groups (+1), hidden_size]``; see the module docstring."""

    def __init__(self, *, in_dim: int, num_points: int, num_groups: int, group_size: int,
                 hidden_size: int, layers: int, heads: int, mlp_ratio: float, select_layer: int,
                 select_feature: str):
        super().__init__()
        self.in_dim, self.num_points = in_dim, num_points
        self.num_groups, self.group_size = num_groups, group_size
        self.hidden_size = hidden_size
        self.num_prefix = 1 if select_feature == "cls_patch" else 0
        self.num_tokens = num_groups + self.num_prefix
        self.select_layer = select_layer
        self.group_embed = MiniPointNet(in_dim, hidden_size)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, hidden_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.transformer = Transformer(hidden_size, layers, heads, mlp_ratio)
        init_weights(self.transformer)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)
        self.transformer.resolve(select_layer)

    def group(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(neighbourhoods [B, G, K, C] relative to their centre, centres [B, G, 3])``."""
        xyz = points[..., :3]
        rows = torch.arange(len(points), device=points.device)[:, None]
        centres = xyz[rows, farthest_point_sample(xyz, self.num_groups)]          # [B, G, 3]
        knn = torch.cdist(centres, xyz).topk(self.group_size, dim=-1, largest=False).indices
        groups = points[rows[:, :, None], knn]                                    # [B, G, K, C]
        groups = torch.cat([groups[..., :3] - centres[:, :, None], groups[..., 3:]], -1)
        return groups, centres

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.dim() != 3 or points.shape[-1] != self.in_dim:
            raise ValueError(f"expected [B, N, {self.in_dim}], got {list(points.shape)}")
        groups, centres = self.group(points)
        tokens = self.group_embed(groups) + self.pos_embed(centres)
        cls = (self.cls_token + self.cls_pos).expand(len(points), -1, -1)
        out = self.transformer(torch.cat([cls, tokens], 1), self.select_layer)
        return out if self.num_prefix else out[:, 1:]


def save_encoder(encoder: nn.Module, path: str | Path) -> Path:
    """Write an encoder's state dict as safetensors (what ``pretrained`` loads)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(path))
    return path


def _resolve_weights(pretrained: str) -> Path:
    p = Path(pretrained).expanduser()
    if p.is_dir():
        p = p / "model.safetensors"
    if p.is_file():
        return p
    if not Path(pretrained).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", pretrained):
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(pretrained, "model.safetensors"))
        except Exception as exc:
            raise ValueError(f"modality 'point': cannot fetch model.safetensors from the hub repo "
                             f"{pretrained!r} ({describe_exc(exc)})") from None
    raise ValueError(f"modality 'point': pretrained weights {pretrained!r} not found (expected a "
                     f".safetensors file or a directory holding model.safetensors)")


class PointCloudPlugin(ModalityPlugin):
    name = "point"
    key = "point"
    placeholder = "<point>"
    default_projector = "mlp2x_gelu"
    extensions = POINT_EXTENSIONS
    default_options: dict[str, Any] = {
        "num_points": 512,        # points after farthest-point sampling
        "use_colors": True,       # [num_points, 6] (xyz + rgb); false: [num_points, 3], xyz only
        "voxel_size": None,       # voxel down-sampling before FPS (null = off), in file units
        "num_groups": 16,         # tokens (FPS centres) of the encoder
        "group_size": 32,         # nearest neighbours per group
        "hidden_size": 64,
        "layers": 2,
        "heads": 4,
        "mlp_ratio": 2.0,
        "pretrained": None,       # null | .safetensors file / directory of this encoder's weights
        "select_layer": None,     # null: -1
        "select_feature": "patch",  # "patch" | "cls_patch"
        "trainable": False,
        "init_seed": 0,
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        check_positive_int(o, ("num_points", "num_groups", "group_size", "hidden_size", "layers",
                               "heads"), self.name)
        check_choice(o, "select_feature", ("patch", "cls_patch"), self.name)
        require(o["num_groups"] <= o["num_points"] and o["group_size"] <= o["num_points"],
                self.name, f"num_groups {o['num_groups']} and group_size {o['group_size']} must "
                           f"not exceed num_points {o['num_points']}")
        require(o["hidden_size"] % o["heads"] == 0, self.name,
                f"hidden_size {o['hidden_size']} is not divisible by heads {o['heads']}")
        require(o["voxel_size"] is None or float(o["voxel_size"]) > 0, self.name,
                "voxel_size must be > 0 or null")

    # ---- reading --------------------------------------------------------------------------------
    def load_points(self, path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
        """``(xyz [N, 3] float64, rgb [N, 3] in [0, 1] or None)``, unvalidated."""
        p = check_file(path, self.name)
        suffix = p.suffix.lower()
        if suffix == ".npy":
            return self._load_npy(p)
        if suffix not in OPEN3D_EXTENSIONS:
            raise ModalityInputError(path, f"unsupported file type {suffix or '(no suffix)'!r}; "
                                           f"expected one of {', '.join(POINT_EXTENSIONS)}",
                                     self.name)
        if suffix == ".ply":
            problem = ply_problem(p)
            if problem:
                raise ModalityInputError(path, problem, self.name)
        import open3d as o3d

        try:
            with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
                pcd = o3d.io.read_point_cloud(str(p), remove_nan_points=False,
                                              remove_infinite_points=False)
        except Exception as exc:
            raise ModalityInputError(path, f"open3d cannot read it ({describe_exc(exc)})",
                                     self.name) from None
        xyz = np.asarray(pcd.points, dtype=np.float64)
        if len(xyz) == 0:
            raise ModalityInputError(
                path, f"no points read: the file is empty, truncated, corrupt or not a "
                      f"{suffix} point cloud", self.name)
        rgb = np.asarray(pcd.colors, dtype=np.float64) if pcd.has_colors() else None
        return xyz, rgb

    def _load_npy(self, p: Path) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise ModalityInputError(p, f"not a readable .npy array ({describe_exc(exc)})",
                                     self.name) from None
        if arr.ndim != 2 or arr.shape[1] not in (3, 6):
            raise ModalityInputError(p, f"expected an array [N, 3] (xyz) or [N, 6] (xyz rgb), got "
                                        f"shape {list(arr.shape)}", self.name)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ModalityInputError(p, f"array dtype {arr.dtype} is not numeric", self.name)
        arr = arr.astype(np.float64)
        rgb = None
        if arr.shape[1] == 6:
            rgb = arr[:, 3:]
            if np.nanmax(rgb, initial=0.0) > 1.0:
                rgb = rgb / 255.0
        return arr[:, :3], rgb

    # ---- preprocessing --------------------------------------------------------------------------
    def preprocess(self, path: str | Path) -> torch.Tensor:
        """Point-cloud file -> float32 ``[num_points, 3]`` (``[num_points, 6]`` with colours)."""
        o = self.options
        xyz, rgb = self.load_points(path)
        n = len(xyz)
        if n == 0:
            raise ModalityInputError(path, "point cloud has no points", self.name)
        bad = int((~np.isfinite(xyz).all(1)).sum())
        if bad:
            raise ModalityInputError(path, f"{bad} of {n} points have NaN or infinite "
                                           f"coordinates", self.name)
        if n == 1:
            raise ModalityInputError(path, "point cloud has a single point; at least 2 are needed",
                                     self.name)
        if o["use_colors"]:
            if rgb is None:
                raise ModalityInputError(path, "the file has no colours but use_colors is true "
                                               "(set use_colors: false for xyz-only data)",
                                         self.name)
            rgb = np.nan_to_num(np.clip(rgb, 0.0, 1.0))
        if o["voxel_size"] is not None:
            xyz, rgb = self._voxel(xyz, rgb if o["use_colors"] else None, float(o["voxel_size"]))
            if len(xyz) < 2:
                raise ModalityInputError(path, f"a single point left after voxel down-sampling "
                                               f"(voxel_size {o['voxel_size']} is too large)",
                                         self.name)
        problem = same_place_problem(xyz)
        if problem:
            raise ModalityInputError(path, problem, self.name)
        xyz = xyz - xyz.mean(0)
        scale = float(np.sqrt((xyz ** 2).sum(1)).max())
        xyz = xyz / scale
        order = sample_indices(xyz, o["num_points"])
        out = xyz[order]
        if o["use_colors"]:
            out = np.concatenate([out, rgb[order]], 1)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    @staticmethod
    def _voxel(xyz: np.ndarray, rgb: np.ndarray | None, size: float):
        import open3d as o3d

        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
        if rgb is not None:
            pcd.colors = o3d.utility.Vector3dVector(rgb)
        down = pcd.voxel_down_sample(size)
        out_rgb = np.asarray(down.colors, dtype=np.float64) if rgb is not None else None
        return np.asarray(down.points, dtype=np.float64), out_rgb

    # ---- encoder --------------------------------------------------------------------------------
    def build_encoder(self) -> PointEncoder:
        o = self.options
        with seeded(o["init_seed"]):
            encoder = PointEncoder(
                in_dim=6 if o["use_colors"] else 3, num_points=o["num_points"],
                num_groups=o["num_groups"], group_size=o["group_size"],
                hidden_size=o["hidden_size"], layers=o["layers"], heads=o["heads"],
                mlp_ratio=o["mlp_ratio"],
                select_layer=-1 if o["select_layer"] is None else o["select_layer"],
                select_feature=o["select_feature"])
        if o["pretrained"]:
            load_encoder_weights(encoder, _resolve_weights(str(o["pretrained"])), self.name,
                                 what="weights", hint="set num_groups / group_size / hidden_size / "
                                 "layers / heads / use_colors as when they were saved")
        return finish_encoder(encoder, o)

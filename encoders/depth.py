"""Depth modality: 16-bit PNG / float TIFF / ``.npy`` / ``.npz`` depth -> ``[C, S, S]`` -> tokens.

Reading:

* PNG / TIFF (Pillow): single-channel modes ``I;16`` / ``I`` (integer depth, divided by
  ``png_scale``: 1000 -> millimetres to metres, as NYU / ScanNet; KITTI uses 256), ``F`` (float,
  taken as is) and ``L`` (8-bit, divided by ``png_scale`` too). Colour images (RGB, RGBA, palette)
  are rejected: they are not depth maps.
* ``.npy``: a float or integer array ``[H, W]`` (also ``[1, H, W]`` / ``[H, W, 1]``);
  ``.npz``: the array ``npz_key`` (``null``: the first one), same shapes.

Invalid pixels -- ``0``, negative, NaN, +-inf -- are masked out. Valid depth is normalised to
``[0, 1]`` by ``(d - depth_min) / (depth_max - depth_min)``, clipped. The defaults are fixed,
0 to 10 m (indoor sensors; NYU caps at 10 m), so that absolute distance (near vs far) survives;
``null`` bounds are the per-image min / max of the valid pixels (a constant map then gives 0.5),
which keeps only *relative* depth -- the right choice for relative (up-to-scale) depth from
monocular estimators. Outdoor data wants e.g. ``depth_max: 80``. ``invert: true`` maps near to 1
(disparity-like). The map is resized like
an image (shorter side to ``image_size``, centre crop) with mask-aware bilinear (antialiased)
interpolation, so invalid pixels do not bleed into valid ones.

Output (``render``):

* ``"depth_mask"`` (default): ``[2, S, S]`` -- the normalised depth centred as ``(d - 0.5) / 0.25``
  (0 where invalid) and the validity mask as +1 valid / -1 invalid.
* ``"gray3"``: ``[3, S, S]`` -- the depth as a gray image (invalid = black) normalised with
  ``mean`` / ``std`` (CLIP's by default), for pretrained image towers (as OneLLM / PathWeave feed
  depth to an image encoder). Required with ``pretrained``.

Bad input -> :class:`ModalityInputError`: missing / empty / truncated file, a colour image or a
non-image file, wrong array shape or dtype, a missing ``npz_key``, no valid pixel at all.

Encoder: the image tower (tiny timm / CLIP, a timm id, or pretrained CLIP/SigLIP/AutoModel) with
the image modality's options; tiny towers and timm ids take 2 or 3 input channels (timm adapts a
pretrained patch embedding to 2). Defaults: 32x32, 8x8 patches -> 16 tokens of
width 64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from encoders._common import (check_choice, check_file, check_vit_options, describe_exc,
                              finish_encoder, require, seeded)
from encoders._towers import build_vision_tower, library_versions
from encoders.image import VIT_OPTIONS, VisionEncoder
from mil_plugins.modality import ModalityInputError, ModalityPlugin

DEPTH_EXTENSIONS = (".png", ".tif", ".tiff", ".npy", ".npz", ".exr")


class DepthPlugin(ModalityPlugin):
    name = "depth"
    key = "depth"
    placeholder = "<depth>"
    default_projector = "mlp2x_gelu"
    extensions = DEPTH_EXTENSIONS
    default_options: dict[str, Any] = {
        **{k: v for k, v in VIT_OPTIONS.items() if k != "resample"},
        "render": "depth_mask",  # "depth_mask" ([2,S,S]) | "gray3" ([3,S,S], for image towers)
        "depth_min": 0.0,        # metres; null: per-image min of valid pixels
        "depth_max": 10.0,       # metres (farther clips to 1); null: per-image max of valid pixels
        "invert": False,         # true: near -> 1
        "png_scale": 1000.0,     # integer PNG value / png_scale = depth (1000: mm -> m)
        "npz_key": None,         # array name in a .npz (null: the first)
        "exr_channel": None,     # channel of an OpenEXR file (null: Z, depth, Y, R, or the only one)
    }

    @property
    def version(self) -> str:  # 2: centred depth_mask rendering; the towers' libraries count too
        return f"2;{library_versions()}"

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        check_vit_options(o, self.name)
        check_choice(o, "render", ("depth_mask", "gray3"), self.name)
        require(float(o["png_scale"]) > 0, self.name, "png_scale must be > 0")
        lo, hi = o["depth_min"], o["depth_max"]
        require(lo is None or hi is None or float(hi) > float(lo), self.name,
                f"depth_max {hi} must be greater than depth_min {lo}")
        require(not o["pretrained"] or o["render"] == "gray3", self.name,
                "a pretrained transformers tower takes 3 channels: set render: gray3")

    @property
    def channels(self) -> int:
        return 3 if self.options["render"] == "gray3" else 2

    # ---- reading --------------------------------------------------------------------------------
    def load_depth(self, path: str | Path) -> np.ndarray:
        """The raw depth map as float ``[H, W]`` (metres for PNG with the default png_scale)."""
        p = check_file(path, self.name)
        suffix = p.suffix.lower()
        if suffix in (".npy", ".npz"):
            arr = self._load_numpy(p, suffix)
        elif suffix == ".exr":
            arr = self._load_exr(p)
        else:
            arr = self._load_image(p)
        if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
            arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
        if arr.ndim != 2:
            raise ModalityInputError(path, f"expected a 2-D depth map [H, W], got shape "
                                           f"{list(arr.shape)}", self.name)
        if min(arr.shape) < 1:
            raise ModalityInputError(path, f"empty depth map (shape {list(arr.shape)})", self.name)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ModalityInputError(path, f"depth array has dtype {arr.dtype}, expected float or "
                                           f"integer", self.name)
        return arr.astype(np.float32 if arr.dtype.itemsize <= 4 else np.float64, copy=False)

    def _load_numpy(self, p: Path, suffix: str) -> np.ndarray:
        try:
            data = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise ModalityInputError(p, f"not a readable {suffix} file ({describe_exc(exc)})",
                                     self.name) from None
        if suffix == ".npy":
            if not isinstance(data, np.ndarray):
                raise ModalityInputError(p, "not a .npy array", self.name)
            return data
        try:
            with data:
                names = list(data.files)
                if not names:
                    raise ModalityInputError(p, ".npz archive holds no arrays", self.name)
                key = self.options["npz_key"]
                if key is None:
                    key = names[0]
                elif key not in names:
                    raise ModalityInputError(p, f"npz_key {key!r} not in the archive (arrays: "
                                                f"{', '.join(names)})", self.name)
                return data[key]
        except ModalityInputError:
            raise
        except Exception as exc:
            raise ModalityInputError(p, f"corrupt .npz archive ({describe_exc(exc)})",
                                     self.name) from None

    def _load_exr(self, p: Path) -> np.ndarray:
        """A float depth channel of an OpenEXR file (metres), through the OpenEXR bindings."""
        try:
            import OpenEXR
        except ImportError:
            raise ModalityInputError(p, "reading .exr needs the OpenEXR package "
                                        "(pip install openexr)", self.name) from None
        try:
            with OpenEXR.File(str(p)) as exr:
                channels = {name: ch.pixels for name, ch in exr.channels().items()}
        except Exception as exc:
            raise ModalityInputError(p, f"not a readable OpenEXR file ({describe_exc(exc)})",
                                     self.name) from None
        wanted = self.options["exr_channel"]
        if wanted is None:
            found = [c for c in ("Z", "depth", "Y", "R") if c in channels]
            if not found and len(channels) == 1:
                found = list(channels)
            if not found:
                raise ModalityInputError(p, f"no depth channel among {sorted(channels)}; set the "
                                            f"option exr_channel", self.name)
            wanted = found[0]
        if wanted not in channels:
            raise ModalityInputError(p, f"exr_channel {wanted!r} not in the file (channels: "
                                        f"{', '.join(sorted(channels))})", self.name)
        return np.asarray(channels[wanted])

    def _load_image(self, p: Path) -> np.ndarray:
        from encoders._common import open_image

        img = open_image(p, self.name, "depth image", allow_nonfinite=True)  # NaN = no depth
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "L"):
            scale = np.float32(1.0 / float(self.options["png_scale"]))
            return np.asarray(img, dtype=np.float32) * scale
        if img.mode == "F":
            return np.asarray(img, dtype=np.float32)
        raise ModalityInputError(
            p, f"is a colour image (mode {img.mode}), not a single-channel depth map (16-bit PNG "
               f"I;16 / I, float F, 8-bit L, or a .npy / .npz array)", self.name)

    # ---- preprocessing --------------------------------------------------------------------------
    def normalize(self, depth: np.ndarray, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """``(depth in [0, 1] with 0 where invalid, validity mask)``, both float32 ``[H, W]``."""
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(depth) & (depth > 0)
        n_valid = int(valid.sum())
        if n_valid == 0:
            raise ModalityInputError(path, f"no valid depth pixel: all {depth.size} are 0, "
                                           f"negative, NaN or infinite", self.name)
        values = depth[valid]
        lo, hi = self.options["depth_min"], self.options["depth_max"]
        lo = float(values.min()) if lo is None else float(lo)
        hi = float(values.max()) if hi is None else float(hi)
        out = np.zeros(depth.shape, np.float32)
        if hi - lo > 1e-12:
            out[valid] = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
        else:
            out[valid] = 0.5
        if self.options["invert"]:
            out[valid] = 1.0 - out[valid]
        return out.astype(np.float32), valid.astype(np.float32)

    def resize(self, depth: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Shorter side to ``image_size`` + centre crop, mask-aware bilinear (normalised conv)."""
        size = int(self.options["image_size"])
        h, w = depth.shape
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = torch.from_numpy(np.stack([depth * mask, mask]))[None]
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=nh < h or nw < w)
        top, left = (nh - size) // 2, (nw - size) // 2
        crop = x[0, :, top: top + size, left: left + size]
        num, den = crop[0], crop[1]
        keep = den >= 0.5
        d = torch.where(keep, num / den.clamp_min(1e-6), torch.zeros_like(num)).clamp(0.0, 1.0)
        return d, keep.float()

    def preprocess(self, path: str | Path) -> torch.Tensor:
        """Depth file -> float32 ``[2, S, S]`` (depth_mask) or ``[3, S, S]`` (gray3)."""
        depth, mask = self.normalize(self.load_depth(path), path)
        d, m = self.resize(depth, mask)
        if self.options["render"] == "gray3":
            mean = torch.tensor(self.options["mean"], dtype=torch.float32)[:, None, None]
            std = torch.tensor(self.options["std"], dtype=torch.float32)[:, None, None]
            return ((d[None].expand(3, -1, -1) - mean) / std).contiguous()
        # centred like normalised image pixels: a frozen random tower keeps near/far apart far
        # better than on raw [0, 1] maps (linear-probe/MLP checks: 0.78 -> 1.00 on near/far)
        return torch.stack([(d - 0.5) / 0.25 * m, m * 2.0 - 1.0]).contiguous()

    # ---- encoder --------------------------------------------------------------------------------
    def build_encoder(self) -> VisionEncoder:
        with seeded(self.options["init_seed"]):
            encoder = VisionEncoder(build_vision_tower(self.options, self.channels, self.name))
        return finish_encoder(encoder, self.options)

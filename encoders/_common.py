"""Helpers shared by the built-in modality plugins (private).

File checks that turn "missing / directory / empty" into :class:`ModalityInputError`, the image
resize + centre-crop + normalise path shared by the image, video (frame folders) and depth plugins,
option validation, and the seeded, frozen-by-default construction of encoders.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from encoders._input_checks import nonfinite_pixels_problem
from mil_plugins.modality import ModalityInputError

# OpenAI CLIP's normalisation (LLaVA's image processor); SigLIP checkpoints use 0.5 / 0.5.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def check_file(path: str | Path, modality: str, *, allow_dir: bool = False) -> Path:
    """``path`` as a Path, or :class:`ModalityInputError` if it is missing, a directory or empty."""
    p = Path(path)
    if not p.exists():
        raise ModalityInputError(path, "file not found", modality)
    if p.is_dir():
        if allow_dir:
            return p
        raise ModalityInputError(path, "is a directory, expected a file", modality)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ModalityInputError(path, f"cannot stat file ({exc})", modality) from None
    if size == 0:
        raise ModalityInputError(path, "empty file (0 bytes)", modality)
    return p


def describe_exc(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


# ---- images -------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def open_image(path: str | Path, modality: str, what: str = "image", allow_nonfinite: bool = False):
    """Open and fully decode an image with Pillow, or raise :class:`ModalityInputError`
    (also for NaN / infinite pixels of a float image, unless ``allow_nonfinite``)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = check_file(path, modality)
    try:
        img = Image.open(p)
    except UnidentifiedImageError:
        raise ModalityInputError(
            path, f"not {_article(what)} {what} file Pillow can read (unrecognised format; "
                  f"expected one of {', '.join(IMAGE_EXTENSIONS)})", modality) from None
    except Exception as exc:  # DecompressionBombError, OSError, ...
        raise ModalityInputError(path, f"cannot open {what} ({describe_exc(exc)})",
                                 modality) from None
    try:
        img.load()  # Image.open is lazy: truncated / corrupt pixel data only fails here
        img = ImageOps.exif_transpose(img) or img
    except Exception as exc:
        raise ModalityInputError(
            path, f"corrupt or truncated {what} data ({describe_exc(exc)})", modality) from None
    problem = None if allow_nonfinite else nonfinite_pixels_problem(img)
    if problem:
        raise ModalityInputError(path, problem, modality)
    return img


def to_rgb(img):
    """Pillow image -> RGB, scaling 16/32-bit grayscale down to 8 bits instead of clipping."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB") if img.mode != "RGB" else img


_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}


def resize_center_crop(img, size: int, resample: str = "bicubic"):
    """Resize the shorter side to ``size`` (aspect kept), then centre-crop ``size`` x ``size``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _RESAMPLE[resample])
    left, top = (nw - size) // 2, (nh - size) // 2
    if (nw, nh) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def normalize_rgb(img, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB Pillow image -> float32 ``[3, H, W]``, ``(x / 255 - mean) / std``."""
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def image_tensor(img, options: dict[str, Any]) -> torch.Tensor:
    img = resize_center_crop(to_rgb(img), int(options["image_size"]), options["resample"])
    return normalize_rgb(img, options["mean"], options["std"])


def natural_key(name: str) -> list:
    """Sort key so that ``frame_2.png`` comes before ``frame_10.png``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


# ---- options ------------------------------------------------------------------------------------

def require(cond: bool, modality: str, message: str) -> None:
    if not cond:
        raise ValueError(f"modality {modality!r}: {message}")


def check_choice(options: dict, key: str, choices: Sequence[Any], modality: str) -> None:
    require(options[key] in choices, modality,
            f"option {key}={options[key]!r} is not one of {list(choices)}")


def check_positive_int(options: dict, keys: Sequence[str], modality: str) -> None:
    for k in keys:
        v = options[k]
        require(isinstance(v, int) and not isinstance(v, bool) and v > 0, modality,
                f"option {k} must be a positive integer, got {v!r}")


def check_vit_options(options: dict, modality: str) -> None:
    """Options of the vision towers (image, video, depth)."""
    from encoders._towers import check_tower_options

    check_positive_int(options, ("image_size", "patch_size", "hidden_size", "layers", "heads"),
                       modality)
    check_choice(options, "select_feature", ("patch", "cls_patch"), modality)
    if "resample" in options:
        check_choice(options, "resample", tuple(_RESAMPLE), modality)
    check_tower_options(options, modality)
    if not options["pretrained"] and not options["timm_model"]:  # a tiny tower
        require(options["image_size"] % options["patch_size"] == 0, modality,
                f"image_size {options['image_size']} is not a multiple of patch_size "
                f"{options['patch_size']}")
        require(options["hidden_size"] % options["heads"] == 0, modality,
                f"hidden_size {options['hidden_size']} is not divisible by heads "
                f"{options['heads']}")
    for k in ("mean", "std"):
        require(len(options[k]) == 3, modality, f"option {k} needs 3 values (R, G, B)")
    require(all(s > 0 for s in options["std"]), modality, "std values must be > 0")


# ---- building encoders --------------------------------------------------------------------------

@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded (``None``: use the global RNG as it is).

    The global RNG state is restored afterwards, so building an encoder does not perturb it.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def finish_encoder(encoder: torch.nn.Module, options: dict[str, Any]) -> torch.nn.Module:
    """Frozen (``requires_grad=False``) unless ``trainable``; returned in eval mode."""
    encoder.requires_grad_(bool(options.get("trainable", False)))
    return encoder.eval()


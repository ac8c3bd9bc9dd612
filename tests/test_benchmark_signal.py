"""The benchmark's signals are learnable: trivial handcrafted features recover every answer.

Each check decodes the files the way a user would (Pillow, PyAV, soundfile, open3d), computes one
or two obvious features (mean colour, compactness, centroid motion, FFT peak, envelope bursts,
median depth per half, radial spread of points) and predicts the answer with a fixed rule. If these
pass, a model that fails on the benchmark cannot blame the data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from _shared import benchmark
from mil_plugins.benchmark.concepts import COLORS, SCENE_ATTRIBUTES, all_scenes, get_task
from mil_plugins.benchmark.depth import read_depth
from mil_plugins.benchmark.point import read_points
from mil_plugins.benchmark.video import read_frames


@pytest.fixture(scope="module")
def root() -> Path:
    return benchmark("tiny", seed=0)  # what make_benchmark wrote, shared read-only


def samples(root: Path, modality: str) -> list[dict]:
    out = []
    for split in ("train", "test"):
        out += json.loads((root / modality / f"{split}.json").read_text())
    return out


def truth(modality: str, sample: dict) -> dict[str, str]:
    """The scene attributes a sample's answer states (one for QA, all of them for a caption)."""
    task = get_task(modality, sample["task"])
    answer = sample["conversations"][1]["value"]
    if task.attribute:
        return {task.attribute: answer}
    matches = [a for a in all_scenes(modality) if task.answer(a) == answer]
    assert len(matches) == 1, answer
    return matches[0]


def check(root: Path, modality: str, predict, min_acc: float = 1.0) -> None:
    hits, total, misses = 0, 0, []
    for s in samples(root, modality):
        pred = predict(root / s[modality])
        for attr, value in truth(modality, s).items():
            total += 1
            if pred[attr] == value:
                hits += 1
            else:
                misses.append((s["id"], attr, value, pred[attr]))
    assert total >= 48
    assert hits / total >= min_acc, f"{modality}: accuracy {hits / total:.3f}; misses {misses[:8]}"


# -- features ------------------------------------------------------------------------------------

def compactness(mask: np.ndarray) -> float:
    """area / (pi * max centroid distance^2): circle ~1, square ~0.64, equilateral triangle ~0.41."""
    ys, xs = np.nonzero(mask)
    d2 = (xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2
    return len(xs) / (np.pi * (np.sqrt(d2.max()) + 0.5) ** 2)


def shape_from_mask(mask: np.ndarray, circle: float = 0.8, square: float = 0.55) -> str:
    """Thresholds on compactness; smaller shapes (32 px video) read lower, so they pass their own."""
    c = compactness(mask)
    return "circle" if c > circle else "square" if c > square else "triangle"


def colored_mask(rgb: np.ndarray, threshold: float = 70) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    return rgb.max(-1) - rgb.min(-1) > threshold


def color_of(rgb: np.ndarray, mask: np.ndarray) -> str:
    return COLORS[int(rgb[mask].mean(0).argmax())]     # COLORS is (red, green, blue): channel order


# -- per modality ----------------------------------------------------------------------------------

def test_image_signal(root):
    def predict(path):
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        mask = colored_mask(rgb)
        xs = np.nonzero(mask)[1]
        return {"color": color_of(rgb, mask), "shape": shape_from_mask(mask),
                "side": "left" if xs.mean() < rgb.shape[1] / 2 else "right"}
    check(root, "image", predict)


def test_video_signal(root):
    def predict(path):
        frames = read_frames(path)
        assert len(frames) >= 2
        masks = [colored_mask(f, 60) for f in frames]
        c0 = np.argwhere(masks[0]).mean(0)
        c1 = np.argwhere(masks[-1]).mean(0)
        dy, dx = c1 - c0
        direction = (("right" if dx > 0 else "left") if abs(dx) > abs(dy)
                     else ("down" if dy > 0 else "up"))
        shapes = [shape_from_mask(m, circle=0.705, square=0.555) for m in masks]
        mid = len(frames) // 2
        return {"direction": direction, "shape": max(set(shapes), key=shapes.count),
                "color": color_of(frames[mid], masks[mid])}
    check(root, "video", predict)


def test_audio_signal(root):
    def predict(path):
        wave, sr = sf.read(str(path), dtype="float32")
        spectrum = np.abs(np.fft.rfft(wave))
        peak = np.fft.rfftfreq(len(wave), 1 / sr)[spectrum.argmax()]
        hop = sr // 100                                  # 10 ms frames
        rms = np.sqrt((wave[: len(wave) // hop * hop].reshape(-1, hop) ** 2).mean(1))
        on = rms > 0.3 * rms.max()
        bursts = int(on[0]) + int(np.sum(on[1:] & ~on[:-1]))
        return {"pitch": "low" if peak < 800 else "high",
                "count": {1: "one", 2: "two", 3: "three"}.get(bursts, str(bursts))}
    check(root, "audio", predict)


def test_depth_signal(root):
    def predict(path):
        d = read_depth(path).astype(np.float32)
        valid = d > 0
        assert 0 < valid.mean() < 1                     # invalid pixels exist, most are valid
        obj = valid & (d < 3000)
        w = d.shape[1] // 2
        left, right = d[:, :w][valid[:, :w]], d[:, w:][valid[:, w:]]
        return {"distance": "near" if np.median(d[obj]) < 1500 else "far",
                "side": "left" if left.mean() < right.mean() else "right",
                "shape": shape_from_mask(obj)}
    check(root, "depth", predict, min_acc=0.95)


def point_features(xyz: np.ndarray) -> tuple[float, float, float]:
    c = (xyz.max(0) + xyz.min(0)) / 2                    # bounding-box centre
    p = xyz - c
    r3 = np.linalg.norm(p, axis=1)
    rxy = np.linalg.norm(p[:, :2], axis=1)
    band = np.abs(p[:, 2]) < 0.5 * np.abs(p[:, 2]).max()
    return (float(r3.std() / r3.mean()), float(np.corrcoef(p[:, 2], rxy)[0, 1]),
            float(rxy[band].std() / rxy[band].mean()))


def test_point_signal(root):
    def predict(path):
        xyz, rgb = read_points(path)
        spread, taper, band_spread = point_features(xyz)
        if spread < 0.05:
            shape = "sphere"
        elif taper < -0.5:
            shape = "cone"
        elif band_spread < 0.06:
            shape = "cylinder"
        else:
            shape = "cube"
        return {"shape3d": shape, "color": COLORS[int(rgb.mean(0).argmax())]}
    check(root, "point", predict)


def test_every_scene_attribute_is_checked():
    # the predictors above cover every attribute of every modality's scenes
    covered = {"image": {"color", "shape", "side"}, "video": {"direction", "shape", "color"},
               "audio": {"pitch", "count"}, "depth": {"distance", "side", "shape"},
               "point": {"shape3d", "color"}}
    assert {m: set(a) for m, a in SCENE_ATTRIBUTES.items()} == covered

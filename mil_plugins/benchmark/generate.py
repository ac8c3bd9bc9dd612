"""Generate the benchmark: every modality's train/test media, manifests, the text split, benchmark.json."""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from . import audio, depth, image, point, video
from .concepts import (EXACT_MATCH, MODALITIES, PLACEHOLDERS, TASKS, TEXT, answer_vocabulary,
                       balanced_scenes)
from .manifest import make_sample, write_json, write_manifest
from .text import generate_text_split

VERSION = "1.1"  # 1.1: small has 432 test samples per modality (was 108)
BENCHMARK_FILE = "benchmark.json"
#: ``modality``: one stage per modality (every task mixed); ``mixed``: also a captioning and a QA
#: stage per modality of audio, image and video (MoInCL's setting, ``benchmark/mixed.py``)
SEQUENCES = ("modality", "mixed")
SPLITS = ("train", "test")

#: samples per modality and split, and text-only samples per split. Media counts are multiples of
#: the 3 tasks; small and full are multiples of 3 x 12, so every answer set (2, 3 or 4 options) is
#: exactly balanced; in tiny, 3-option answers are balanced to within one sample.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"train": 48, "test": 24, "text_train": 300, "text_test": 60},
    "small": {"train": 432, "test": 432, "text_train": 1200, "text_test": 150},
    "full": {"train": 3024, "test": 504, "text_train": 4500, "text_test": 600},
}

RENDERERS = {"image": image, "video": video, "audio": audio, "depth": depth, "point": point}

FORMATS = {
    "image": f"PNG, RGB 8-bit, {image.SIZE}x{image.SIZE}",
    "video": f"MP4 ({video.codec()}, yuv420p), {video.FRAMES} frames of {video.SIZE}x{video.SIZE} "
             f"at {video.FPS} fps",
    "audio": f"WAV, mono PCM_16, {audio.SAMPLE_RATE} Hz, {audio.DURATION:g} s",
    "depth": f"PNG, 16-bit grey (uint16 millimetres, 0 = no reading), {depth.SIZE}x{depth.SIZE}",
    "point": f"PLY (binary, open3d), {point.NUM_POINTS} points, xyz float64 + rgb",
}


def _code(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def split_rng(seed: int, modality: str, split: str, *more: int) -> np.random.Generator:
    """The Generator for (seed, modality, split[, sample]): stable across runs and platforms."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _code(modality), _code(split), *more]))


def generate_media_split(out: Path, modality: str, split: str, n: int, seed: int) -> list[dict]:
    """Render ``n`` samples of ``modality`` into ``out/<modality>/files`` and return their samples."""
    renderer = RENDERERS[modality]
    tasks = TASKS[modality]
    rng = split_rng(seed, modality, split)
    # tasks interleaved round-robin; within each task every scene attribute is balanced
    scenes = {t.name: iter(balanced_scenes(modality, len(range(k, n, len(tasks))), rng))
              for k, t in enumerate(tasks)}
    files = out / modality / "files"
    files.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        attrs = next(scenes[task.name])
        rel = f"{modality}/files/{split}_{i + 1:05d}{renderer.EXT}"
        renderer.render(attrs, split_rng(seed, modality, split, i), out / rel)
        samples.append(make_sample(f"{modality}-{split}-{i + 1:05d}", task.question, task.answer(attrs),
                                   task=task.name, metric=task.metric, modality=modality, media=rel,
                                   options=task.options))
    return samples


def _split_summary(modality: str, split: str, samples: list[dict]) -> dict:
    tasks: dict[str, dict] = {}
    for s in samples:
        entry = tasks.setdefault(s["task"], {"metric": s["metric"], "num_samples": 0})
        entry["num_samples"] += 1
        if s["metric"] == EXACT_MATCH:
            answers = entry.setdefault("answers", {})
            a = s["conversations"][1]["value"]
            answers[a] = answers.get(a, 0) + 1
    for entry in tasks.values():
        if "answers" in entry:
            entry["answers"] = dict(sorted(entry["answers"].items()))
            entry["majority"] = round(max(entry["answers"].values()) / entry["num_samples"], 4)
    return {"manifest": f"{modality}/{split}.json", "num_samples": len(samples), "tasks": tasks}


def _normalize(size: str, modalities: Iterable[str] | None) -> list[str]:
    if size not in SIZES:
        raise ValueError(f"unknown benchmark size {size!r}; valid: {sorted(SIZES)}")
    everything = list(MODALITIES) + [TEXT]
    if modalities is None:
        return everything
    if isinstance(modalities, str):
        modalities = [modalities]
    wanted = list(dict.fromkeys(modalities))
    unknown = [m for m in wanted if m not in everything]
    if unknown:
        raise ValueError(f"unknown benchmark modality {unknown}; valid: {everything}")
    return [m for m in everything if m in wanted]


def _complete(out: Path, meta: dict, names: list[str]) -> bool:
    splits = meta.get("splits", {})
    return all(m in splits and all((out / splits[m][s]["manifest"]).is_file() for s in SPLITS)
               for m in names)


def make_benchmark(out_dir: str | Path, size: str = "tiny", seed: int = 0,
                   modalities: Iterable[str] | None = None, overwrite: bool = False,
                   sequence: str = "modality") -> dict:
    """Generate the benchmark into ``out_dir`` (the data root) and return its summary.

    ``sequence="mixed"``: the media of audio, image, video and the text split only (unless
    ``modalities`` says otherwise), then the mixed sequence's manifests (a captioning and a QA
    stage per modality, :mod:`mil_plugins.benchmark.mixed`) under ``out_dir/mixed``; the summary
    carries them under ``"mixed"``.
    """
    if sequence not in SEQUENCES:
        raise ValueError(f"unknown benchmark sequence {sequence!r}; valid: {list(SEQUENCES)}")
    if sequence == "modality":
        return _make_media(out_dir, size, seed, modalities, overwrite)
    from .mixed import MODALITIES as MIXED_MODALITIES, write_mixed_sequence

    wanted = list(modalities) if modalities is not None else [*MIXED_MODALITIES, TEXT]
    summary = _make_media(out_dir, size, seed, wanted, overwrite)
    summary["mixed"] = write_mixed_sequence(out_dir)
    return summary


def _make_media(out_dir: str | Path, size: str, seed: int, modalities: Iterable[str] | None,
                overwrite: bool) -> dict:
    """The modality sequence's media, manifests and ``benchmark.json`` (see below).

    Writes ``<out>/<modality>/{train,test}.json`` with media under ``<out>/<modality>/files/`` for
    each of image, video, audio, depth, point, ``<out>/text/{train,test}.json`` (text-only warm-up),
    and ``<out>/benchmark.json`` (size, seed, version, tasks, per-split counts), written last.

    If ``benchmark.json`` already records the same size, seed and version and the requested
    modalities, nothing is done (``summary["generated"]`` is False). Modalities missing from an
    otherwise matching benchmark are added. A benchmark of another size/seed/version is only
    replaced with ``overwrite=True``, which also deletes the media folders of the regenerated
    modalities first. Same ``seed`` -> identical manifests and identical decoded media.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    names = _normalize(size, modalities)
    meta_path = out / BENCHMARK_FILE
    meta: dict = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
    if meta:
        same = (meta.get("size"), meta.get("seed"), meta.get("version")) == (size, seed, VERSION)
        if not same and not overwrite:
            raise FileExistsError(
                f"{out} already holds a benchmark with size={meta.get('size')!r}, "
                f"seed={meta.get('seed')!r}, version={meta.get('version')!r} (asked: size={size!r}, "
                f"seed={seed!r}, version={VERSION!r}); pass overwrite=True (mil make-benchmark "
                f"--overwrite) to replace it, or choose another folder")
        if not same:
            meta = {}
        elif not overwrite and _complete(out, meta, names):
            return {**meta, "root": str(out.resolve()), "generated": False,
                    "seconds": round(time.perf_counter() - t0, 3)}
    todo = [m for m in names if overwrite or not _complete(out, meta, [m])]

    counts = SIZES[size]
    splits = dict(meta.get("splits", {}))
    for m in todo:
        if overwrite and (out / m / "files").is_dir():
            shutil.rmtree(out / m / "files")
        splits[m] = {}
        for split in SPLITS:
            if m == TEXT:
                samples = generate_text_split(split, counts[f"text_{split}"], split_rng(seed, m, split))
            else:
                samples = generate_media_split(out, m, split, counts[split], seed)
            write_manifest(out / m / f"{split}.json", samples)
            splits[m][split] = _split_summary(m, split, samples)

    present = [m for m in list(MODALITIES) + [TEXT] if m in splits]
    meta = {
        "name": "mil-plugins synthetic modality-incremental benchmark",
        "version": VERSION,
        "size": size,
        "seed": seed,
        "order": [m for m in MODALITIES if m in present],
        "modalities": present,
        "media": {m: {"key": m, "placeholder": PLACEHOLDERS[m], "format": FORMATS[m]}
                  for m in MODALITIES if m in present},
        "tasks": {m: {t.name: t.describe() for t in TASKS[m]} for m in MODALITIES if m in present},
        "splits": {m: splits[m] for m in present},
        "answer_vocabulary": answer_vocabulary(),
    }
    write_json(meta_path, meta, indent=1)
    return {**meta, "root": str(out.resolve()), "generated": True,
            "seconds": round(time.perf_counter() - t0, 3)}

"""The mixed sequence: per modality a captioning stage and a QA stage (MoInCL's setting).

MoInCL (arXiv 2412.13050) changes the task type as well as the modality from stage to stage. This
module cuts the generated benchmark's audio, image and video manifests into one captioning stage
and one QA stage per modality, each with its own train/test manifests::

    OUT/mixed/audio_caption/train.json   the modality's caption samples (metric: cider)
    OUT/mixed/audio_qa/train.json        its QA samples (both QA tasks; metric: exact_match)
    ... image_caption, image_qa, video_caption, video_qa; test.json beside each train.json
    OUT/mixed/sequence.json              the stages, the paper's two orders, per-stage counts

The media files are the benchmark's own (no new rendering); a caption sample keeps its id, media
and conversation, only its ``metric`` becomes ``cider`` (CIDEr-D, as the paper scores captions).
Files are written only when missing or different, so a run's data fingerprint stays stable.
"""

from __future__ import annotations

import json
from pathlib import Path

from .concepts import EXACT_MATCH
from .manifest import read_manifest, write_json, write_manifest

MIXED_DIR = "mixed"
MODALITIES = ("audio", "image", "video")
TASK_TYPES = ("caption", "qa")
CAPTION_METRIC = "cider"
SPLITS = ("train", "test")

#: the paper's two orders (method card section 3), as stage names
ORDERS: dict[str, tuple[str, ...]] = {
    "order1": ("audio_caption", "image_caption", "video_qa", "audio_qa", "image_qa",
               "video_caption"),
    "order2": ("image_caption", "video_caption", "video_qa", "image_qa", "audio_caption",
               "audio_qa"),
}


def stage_name(modality: str, task_type: str) -> str:
    return f"{modality}_{task_type}"


def split_stage_name(name: str) -> tuple[str, str]:
    """``"audio_qa"`` -> ``("audio", "qa")``."""
    modality, _, task_type = name.rpartition("_")
    if modality not in MODALITIES or task_type not in TASK_TYPES:
        raise ValueError(f"{name!r} is not a mixed-sequence stage; stages: "
                         f"{[stage_name(m, t) for m in MODALITIES for t in TASK_TYPES]}")
    return modality, task_type


def is_mixed_stage(name: str) -> bool:
    try:
        split_stage_name(name)
    except ValueError:
        return False
    return True


def manifest_path(name: str, split: str) -> str:
    """The manifest of stage ``name`` and ``split``, relative to the data root."""
    split_stage_name(name)
    return f"{MIXED_DIR}/{name}/{split}.json"


def task_type_of(sample: dict) -> str:
    """``qa`` for an exact-match sample, ``caption`` for a captioning one."""
    return "qa" if sample.get("metric") == EXACT_MATCH else "caption"


def mixed_samples(samples: list[dict], task_type: str) -> list[dict]:
    """The samples of one task type, captions re-labelled with :data:`CAPTION_METRIC`."""
    out = []
    for s in samples:
        if task_type_of(s) != task_type:
            continue
        out.append({**s, "metric": CAPTION_METRIC} if task_type == "caption" else dict(s))
    return out


def _write_if_changed(path: Path, samples: list[dict]) -> bool:
    if path.is_file():
        try:
            if read_manifest(path) == samples:
                return False
        except (OSError, ValueError):
            pass
    write_manifest(path, samples)
    return True


def write_mixed_sequence(root: str | Path) -> dict:
    """Write the mixed sequence's manifests under ``root/mixed`` from the benchmark in ``root``
    (its audio, image and video manifests must exist); returns the ``sequence.json`` summary."""
    root = Path(root)
    stages: dict[str, dict] = {}
    written = 0
    for modality in MODALITIES:
        for split in SPLITS:
            source = root / modality / f"{split}.json"
            if not source.is_file():
                raise FileNotFoundError(f"{source}: the mixed sequence is cut from the benchmark's "
                                        f"{modality} manifests; generate the benchmark first")
            samples = read_manifest(source)
            for task_type in TASK_TYPES:
                name = stage_name(modality, task_type)
                part = mixed_samples(samples, task_type)
                if not part:
                    raise ValueError(f"{source}: no {task_type} samples to make stage {name!r}")
                written += _write_if_changed(root / manifest_path(name, split), part)
                entry = stages.setdefault(name, {"modality": modality, "task_type": task_type,
                                                 "tasks": sorted({s["task"] for s in part})})
                entry[split] = {"manifest": manifest_path(name, split), "num_samples": len(part)}
    summary = {"name": "mil-plugins mixed sequence (modality x task type)",
               "stages": stages, "orders": {k: list(v) for k, v in ORDERS.items()},
               "caption_metric": CAPTION_METRIC, "qa_metric": EXACT_MATCH}
    meta_path = root / MIXED_DIR / "sequence.json"
    old = None
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
    if old != summary:
        write_json(meta_path, summary, indent=1)
    return {**summary, "written": written}


def chance_level(modality: str, task: str) -> float:
    """Expected score of a uniform random guess for a task of a mixed-sequence stage, on the
    scale :func:`mil_plugins.benchmark.concepts.chance_level` uses (x 100 in reports).

    QA tasks: as in the modality sequence. ``caption``: CIDEr-D (the mixed sequence's caption
    metric) of the captions of uniformly random scenes against the true ones, over every
    (guess, truth) pair of scenes, as the BLEU-4 chance is computed."""
    from .concepts import all_scenes, chance_level as base, get_task

    t = get_task(modality, task)
    if t.metric == EXACT_MATCH:
        return base(modality, task)
    from mil_plugins.scoring import cider_d

    caps = [t.answer(a) for a in all_scenes(modality)]
    return cider_d([p for p in caps for _ in caps], [r for _ in caps for r in caps])

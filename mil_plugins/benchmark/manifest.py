"""LLaVA conversation manifests: building samples, checking them, writing them atomically.

A manifest is a JSON list of samples::

    {"id": "image-train-00001", "image": "image/files/train_00001.png",
     "task": "shape", "metric": "exact_match", "options": ["circle", "square", "triangle"],
     "conversations": [{"from": "human", "value": "<image>\\nWhat shape is shown? Answer ..."},
                       {"from": "gpt", "value": "circle"}]}

The media key is the modality's name and the path is relative to the data root (the benchmark's
output folder). ``options`` is present for exact-match tasks only. Text-only samples have no media
key and no placeholder.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .concepts import EXACT_MATCH, METRICS, MODALITIES, PLACEHOLDERS


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_manifest(path: str | Path, samples: list[dict]) -> None:
    write_json(path, samples, indent=1)


def read_manifest(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a manifest is a JSON list of samples, got {type(data).__name__}")
    return data


def make_sample(sample_id: str, question: str, answer: str, task: str, metric: str,
                modality: str | None = None, media: str | None = None,
                options: Iterable[str] | None = None) -> dict:
    """One LLaVA sample; with ``modality`` the first human turn starts with its placeholder."""
    sample: dict[str, Any] = {"id": sample_id}
    value = question
    if modality is not None:
        sample[modality] = media
        value = f"{PLACEHOLDERS[modality]}\n{question}"
    sample["task"] = task
    sample["metric"] = metric
    if options:
        sample["options"] = list(options)
    sample["conversations"] = [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return sample


def check_sample(sample: dict, modality: str | None) -> list[str]:
    """Problems with one sample of a ``modality`` manifest (``None``: text-only); [] when fine."""
    errs = []
    sid = sample.get("id", "?")
    for key in ("id", "task", "metric", "conversations"):
        if key not in sample:
            errs.append(f"{sid}: missing key {key!r}")
    if errs:
        return errs
    if sample["metric"] not in METRICS:
        errs.append(f"{sid}: unknown metric {sample['metric']!r}")
    conv = sample["conversations"]
    if (not isinstance(conv, list) or len(conv) < 2 or conv[0].get("from") != "human"
            or conv[1].get("from") != "gpt"):
        return errs + [f"{sid}: conversations must start with a human turn then a gpt turn"]
    answer = conv[1].get("value", "")
    if not answer.strip():
        errs.append(f"{sid}: empty answer")
    first = conv[0].get("value", "")
    present = [m for m in MODALITIES if m in sample]
    if modality is None:
        if present:
            errs.append(f"{sid}: text-only sample has media key(s) {present}")
    else:
        if present != [modality]:
            errs.append(f"{sid}: media keys {present}, expected [{modality!r}]")
        if not first.startswith(PLACEHOLDERS[modality] + "\n"):
            errs.append(f"{sid}: first human turn does not start with {PLACEHOLDERS[modality]!r}")
    total = sum(t["value"].count(p) for t in conv for p in PLACEHOLDERS.values())
    if total != (0 if modality is None else 1):
        errs.append(f"{sid}: {total} placeholder(s) in the conversation")
    if sample["metric"] == EXACT_MATCH:
        opts = sample.get("options")
        if not opts:
            errs.append(f"{sid}: exact_match sample without options")
        elif answer not in opts:
            errs.append(f"{sid}: answer {answer!r} not among options {opts}")
    return errs

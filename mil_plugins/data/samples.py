"""The records of a manifest: :class:`Sample`, :class:`SkippedSample`, :class:`ManifestData`,
the keys a manifest may hold, and the placeholder helpers (see :mod:`mil_plugins.data.manifest`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from mil_plugins.data.errors import DataError

ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt",
                "system": "system"}
METADATA_KEYS = ("task", "metric", "options", "meta", "source")  # options: answer choices of a QA sample
BASE_KEYS = ("id", "conversations")
# keys that are modalities in LLaVA-style data even when no plugin for them is enabled (error hints)
COMMON_MODALITY_KEYS = ("image", "images", "video", "videos", "audio", "depth", "point", "pointcloud",
                        "point_cloud", "thermal", "imu", "tactile", "speech", "event", "ecg")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


# --------------------------------------------------------------------------------------------------
# plugins: what the manifest needs from them
# --------------------------------------------------------------------------------------------------
def plugin_manifest_key(plugin: Any) -> str:
    """``plugin.manifest_key`` for an instance or a class."""
    if isinstance(plugin, type):
        return plugin.key or plugin.name
    return plugin.manifest_key


def placeholder_regex(placeholders: Iterable[str]) -> re.Pattern | None:
    """One regex matching any of ``placeholders`` (longest first, so ``<img>`` never eats ``<img2>``)."""
    items = sorted({p for p in placeholders if p}, key=len, reverse=True)
    if not items:
        return None
    return re.compile("|".join(re.escape(p) for p in items))


def find_placeholders(text: str, pattern: re.Pattern | None) -> list[str]:
    """The placeholders in ``text``, in order."""
    return pattern.findall(text) if pattern is not None else []


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One validated sample.

    ``conversations``: turns ``{"from": "human"|"gpt"|"system", "value": str}`` (roles normalised).
    ``media``: modality name -> absolute, resolved paths, in the order of that modality's
    placeholders in the human turns.
    """

    id: str
    conversations: list[dict]
    media: dict[str, list[Path]]
    task: str | None = None
    metric: str | None = None
    manifest: Path | None = None
    index: int = 0
    meta: Any = None
    source: Any = None
    options: tuple[str, ...] | None = None  # the answer choices of a question, when listed

    @property
    def modalities(self) -> list[str]:
        """The modalities this sample has files for (manifest key order)."""
        return [m for m, files in self.media.items() if files]

    def media_in_order(self, plugins: Mapping[str, Any]) -> list[tuple[str, Path]]:
        """``(modality, path)`` for every placeholder occurrence, in text order (human turns)."""
        by_placeholder = {p.placeholder: m for m, p in plugins.items()}
        pattern = placeholder_regex(by_placeholder)
        used: dict[str, int] = {}
        out: list[tuple[str, Path]] = []
        for turn in self.conversations:
            if turn["from"] != "human":
                continue
            for ph in find_placeholders(turn["value"], pattern):
                modality = by_placeholder[ph]
                k = used.get(modality, 0)
                files = self.media.get(modality, [])
                if k >= len(files):
                    raise self.error(f"more {ph!r} placeholders than files under "
                                     f"{plugin_manifest_key(plugins[modality])!r}")
                out.append((modality, files[k]))
                used[modality] = k + 1
        for modality, files in self.media.items():
            if used.get(modality, 0) != len(files):
                raise self.error(f"{len(files)} {modality} file(s) but {used.get(modality, 0)} "
                                 f"placeholder(s) in the human turns")
        return out

    def error(self, problem: str, file: str | Path | None = None) -> DataError:
        """A :class:`DataError` about this sample."""
        return DataError(problem, manifest=self.manifest, sample_id=self.id, index=self.index,
                         file=file)


@dataclass
class SkippedSample:
    """A sample left out with ``on_error="skip"``: its id (None if it had none), index, the first
    file involved (if any) and the reason(s); ``problems`` lists every ``(file, reason)``."""

    id: str | None
    index: int
    file: str | None
    reason: str
    manifest: Path | None = None
    problems: list[tuple[str | None, str]] = field(default_factory=list)

    def error(self) -> DataError:
        return DataError(self.reason, manifest=self.manifest, sample_id=self.id, index=self.index)

    def __str__(self) -> str:
        return str(self.error())


@dataclass
class ManifestData:
    samples: list[Sample]
    skipped: list[SkippedSample]
    path: Path | None
    paths: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)



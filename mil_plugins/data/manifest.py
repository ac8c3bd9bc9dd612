"""LLaVA-format manifests with any number of modalities: reading and validation.

A manifest is LLaVA's conversation JSON -- a list of samples, or one sample per line (JSONL) --
with one key per modality, named by the plugin's ``manifest_key``::

    {"id": "s1", "image": "img/1.png", "audio": ["a/1.wav", "a/2.wav"],
     "conversations": [{"from": "human", "value": "<image>\\n<audio> <audio> Which is louder?"},
                       {"from": "gpt", "value": "the first"}],
     "task": "audio_cmp", "metric": "exact"}

A modality's value is one path or a list of paths, relative to the data root; its files are used in
the order of that modality's placeholders in the human turns. ``"from"`` is ``human``/``gpt``
(``user``/``assistant`` are read as those; one leading ``system`` turn is allowed). Besides ``id``,
``conversations`` and the modality keys, the keys ``task``, ``metric``, ``meta`` and ``source`` are
allowed; anything else is an error (a misspelt or uninstalled modality must not be ignored).
Media paths are relative to the data root (default: the manifest's directory); a path that leaves the
root, written as ``..`` or as an absolute path, or through a symlink inside the root that points out
of it, is an error. ``Sample.media`` holds absolute, resolved paths. A sample with a key given twice,
or text that is not valid Unicode (a lone surrogate) is bad too.

Every problem is a :class:`DataError` naming the manifest, the sample and the problem. With
``on_error="skip"`` bad samples are left out and listed in :attr:`ManifestData.skipped`; a file that
cannot be read as a whole (not UTF-8, invalid JSON) always raises.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from mil_plugins.data.errors import DataError
from mil_plugins.data.manifest_check import (_Checker, _inside, _installed_modalities,  # noqa: F401
                                             _looks_like_media, _text_problems)
from mil_plugins.data.manifest_read import (_BadLine, _decode, _JSONObject,  # noqa: F401
                                            _object_pairs, _read_records)
from mil_plugins.data.samples import (BASE_KEYS, COMMON_MODALITY_KEYS,  # noqa: F401
                                      JSONL_SUFFIXES, METADATA_KEYS, ROLE_ALIASES, ManifestData,
                                      Sample, SkippedSample, find_placeholders,
                                      placeholder_regex, plugin_manifest_key)

log = logging.getLogger(__name__)


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def load_manifest(path: str | Path, root: str | Path | None = None,
                  plugins: Mapping[str, Any] | None = None, on_error: str = "raise"
                  ) -> ManifestData:
    """Read and validate a manifest (JSON list or JSONL).

    ``root``: the data root media paths are relative to (default: the manifest's directory); no
    media path may leave it. ``plugins``: modality name -> plugin (instance or class), the
    modalities this data may use. ``on_error``: ``"raise"`` the first bad sample's
    :class:`DataError`, or ``"skip"`` bad samples and list them in ``skipped``.
    """
    _check_on_error(on_error)
    path = Path(path).expanduser().absolute()
    root = Path(root).expanduser() if root is not None else path.parent
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory", manifest=path)
    checker = _Checker(path, root.resolve(), dict(plugins or {}))
    samples: list[Sample] = []
    skipped: list[SkippedSample] = []
    first_index: dict[str, int] = {}
    for index, rec in enumerate(_read_records(path)):
        sid, sample, problems = checker.check(rec, index)
        if sample is not None and sample.id in first_index:
            problems = [(None, f"duplicate id (first used by the sample at index "
                               f"{first_index[sample.id]})")]
            sample = None
        if sample is None:
            reason = "; ".join(reason for _, reason in problems)
            file = next((f for f, _ in problems if f), None)
            if on_error == "raise":
                raise DataError(reason, manifest=path, sample_id=sid, index=index, file=file)
            skipped.append(SkippedSample(sid, index, file, reason, path, problems))
            continue
        first_index[sample.id] = index
        samples.append(sample)
    if skipped:
        log.warning("%s: skipped %d bad sample(s) of %d; first: %s", path, len(skipped),
                    len(samples) + len(skipped), skipped[0])
    return ManifestData(samples, skipped, path, [path])


def load_manifests(paths: Sequence[str | Path], root: str | Path | None = None,
                   plugins: Mapping[str, Any] | None = None, on_error: str = "raise"
                   ) -> ManifestData:
    """Several manifests as one: samples concatenated in order, ids unique across all of them.

    ``root`` applies to every manifest (default: each manifest's own directory).
    """
    _check_on_error(on_error)
    samples: list[Sample] = []
    skipped: list[SkippedSample] = []
    seen: dict[str, Sample] = {}
    resolved: list[Path] = []
    for p in paths:
        data = load_manifest(p, root, plugins, on_error)
        resolved.append(data.path)
        skipped.extend(data.skipped)
        for s in data.samples:
            if s.id in seen:
                first = seen[s.id]
                problem = f"duplicate id (also used in {first.manifest}, index {first.index})"
                if on_error == "raise":
                    raise s.error(problem)
                skipped.append(SkippedSample(s.id, s.index, None, problem, s.manifest,
                                             [(None, problem)]))
                continue
            seen[s.id] = s
            samples.append(s)
    return ManifestData(samples, skipped, resolved[0] if resolved else None, resolved)

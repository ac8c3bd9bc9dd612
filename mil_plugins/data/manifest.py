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

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mil_plugins.data.errors import DataError

ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt",
                "system": "system"}
METADATA_KEYS = ("task", "metric", "options", "meta", "source")  # options: answer choices of a QA sample
BASE_KEYS = ("id", "conversations")
# keys that are modalities in LLaVA-style data even when no plugin for them is enabled (error hints)
COMMON_MODALITY_KEYS = ("image", "images", "video", "videos", "audio", "depth", "point", "pointcloud",
                        "point_cloud", "thermal", "imu", "tactile", "speech", "event", "ecg")
JSONL_SUFFIXES = (".jsonl", ".ndjson")

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------------
# reading the file
# --------------------------------------------------------------------------------------------------
@dataclass
class _BadLine:
    problem: str


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("manifest file not found", manifest=path) from None
    except OSError as exc:
        raise DataError(f"cannot read the manifest: {exc}", manifest=path) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"not UTF-8 text: invalid byte 0x{raw[exc.start]:02x} at byte offset "
                        f"{exc.start} (line {line}); save the manifest as UTF-8",
                        manifest=path) from None


def _read_records(path: Path) -> list[Any]:
    """The records of a JSON list or JSONL file; a bad JSONL line becomes a :class:`_BadLine`."""
    text = _decode(path)
    stripped = text.lstrip()
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    if not jsonl:
        if not stripped:
            raise DataError("empty file; expected a JSON list of samples or JSONL", manifest=path)
        try:
            data = json.loads(text, object_pairs_hook=_object_pairs)
        except json.JSONDecodeError as exc:
            if stripped.startswith("{") and exc.msg == "Extra data":
                jsonl = True  # one object per line, whatever the suffix
            else:
                raise DataError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                                manifest=path) from None
        else:
            if isinstance(data, list):
                return data
            if isinstance(data, dict) and "conversations" in data:
                return [data]  # a single sample (a one-line JSONL file)
            raise DataError(f"the top level is a JSON {type(data).__name__}; expected a list of "
                            f"samples (JSON) or one sample object per line (JSONL)", manifest=path)
    records: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line, object_pairs_hook=_object_pairs))
        except json.JSONDecodeError as exc:
            records.append(_BadLine(f"invalid JSON at line {lineno}, column {exc.colno}: "
                                    f"{exc.msg}"))
    return records


# --------------------------------------------------------------------------------------------------
# validating one record
# --------------------------------------------------------------------------------------------------
def _installed_modalities() -> set[str]:
    try:
        from mil_plugins.plugins import MODALITIES
        return set(MODALITIES.names())
    except Exception:  # discovery must never break reading data
        return set()


def _inside(path: Path, root: Path) -> bool:
    try:
        return os.path.commonpath([str(path), str(root)]) == str(root)
    except ValueError:  # different drives
        return False


class _JSONObject(dict):
    """A JSON object that remembers keys given twice (``json`` keeps only the last)."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict:
    obj = _JSONObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _text_problems(value: Any, where: str = "") -> list[str]:
    """Duplicate keys and strings that are not valid Unicode (lone surrogates from ``\\ud800``
    escapes), anywhere in a record."""
    out: list[str] = []
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            out.append(f"{where or 'a value'}: text holds an unpaired surrogate "
                       f"(\\u{ord(value[exc.start]):04x} at character {exc.start}); it is not "
                       f"valid Unicode")
    elif isinstance(value, dict):
        for key in getattr(value, "duplicates", ()):
            out.append(f"{where + ': ' if where else ''}duplicate key {key!r} in one JSON object "
                       f"(JSON keeps only the last)")
        for k, v in value.items():
            out.extend(_text_problems(k, f"{where}.{k}".lstrip(".") + " (key)"))
            out.extend(_text_problems(v, f"{where}.{k}".lstrip(".")))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_text_problems(v, f"{where}[{i}]"))
    return out


def _looks_like_media(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(isinstance(v, str) and Path(v).suffix for v in values)


class _Checker:
    def __init__(self, path: Path, root: Path, plugins: Mapping[str, Any]):
        self.path = path
        self.root = root
        self.real_root = Path(os.path.realpath(root))
        self.key_to_modality: dict[str, str] = {}
        for modality, plugin in plugins.items():
            key = plugin_manifest_key(plugin)
            if key in self.key_to_modality:
                raise ValueError(f"modalities {self.key_to_modality[key]!r} and {modality!r} use "
                                 f"the same manifest key {key!r}")
            if key in BASE_KEYS or key in METADATA_KEYS:
                raise ValueError(f"modality {modality!r} uses the reserved manifest key {key!r}")
            self.key_to_modality[key] = modality
        self.placeholder_to_modality = {p.placeholder: m for m, p in plugins.items()}
        self.pattern = placeholder_regex(self.placeholder_to_modality)
        self.allowed = set(BASE_KEYS) | set(METADATA_KEYS) | set(self.key_to_modality)
        self._installed: set[str] | None = None

    def installed(self) -> set[str]:
        if self._installed is None:
            self._installed = _installed_modalities()
        return self._installed

    # each check appends (file or None, reason) to ``problems``
    def check(self, rec: Any, index: int) -> tuple[str | None, Sample | None, list]:
        problems: list[tuple[str | None, str]] = []
        if isinstance(rec, _BadLine):
            return None, None, [(None, rec.problem)]
        if not isinstance(rec, dict):
            return None, None, [(None, f"a sample must be a JSON object, got "
                                       f"{type(rec).__name__}")]
        sid = self._id(rec, problems)
        self._keys(rec, problems)
        turns = self._conversations(rec, problems)
        media, listed = self._media(rec, problems)
        if turns is not None:
            self._counts(turns, listed, problems)
        meta = {}
        for key in ("task", "metric"):
            value = rec.get(key)
            if value is not None and not isinstance(value, str):
                problems.append((None, f"{key!r} must be a string or null, got "
                                       f"{type(value).__name__}"))
            meta[key] = value
        options = rec.get("options")
        if options is not None and (not isinstance(options, list) or not options or not all(
                isinstance(o, str) and o.strip() for o in options)):
            problems.append((None, "'options' must be a non-empty list of non-empty strings "
                                   "(the answer choices of a question) or null"))
        problems.extend((None, p) for p in _text_problems(rec))
        if problems:
            return sid, None, problems
        sample = Sample(id=sid, conversations=turns, media=media, task=meta["task"],
                        metric=meta["metric"], manifest=self.path, index=index,
                        meta=rec.get("meta"), source=rec.get("source"),
                        options=tuple(options) if options else None)
        return sid, sample, []

    def _id(self, rec: dict, problems: list) -> str | None:
        if "id" not in rec or rec["id"] is None:
            problems.append((None, "missing 'id'"))
            return None
        sid = rec["id"]
        if isinstance(sid, bool) or not isinstance(sid, (str, int)):
            problems.append((None, f"'id' must be a string, got {type(sid).__name__}"))
            return None
        sid = str(sid)
        if not sid.strip():
            problems.append((None, "empty 'id'"))
            return None
        return sid

    def _keys(self, rec: dict, problems: list) -> None:
        known = ", ".join(sorted(self.key_to_modality)) or "(none)"
        for key in rec:
            if key in self.allowed:
                continue
            text = json.dumps(rec.get("conversations", ""), ensure_ascii=False)
            installed = self.installed()
            if key in installed:
                hint = (f"; it is the manifest key of the installed modality plugin {key!r}, "
                        f"which is not enabled for this data")
            elif (key in COMMON_MODALITY_KEYS or f"<{key}>" in text
                  or _looks_like_media(rec[key])):
                hint = (f"; it looks like a modality, but no modality plugin for {key!r} is "
                        f"installed (see `mil plugins`)")
            else:
                hint = (f"; allowed keys: id, conversations, {', '.join(METADATA_KEYS)} and "
                        f"the modality keys")
            problems.append((None, f"unknown key {key!r} (known modality keys: {known}){hint}"))

    def _conversations(self, rec: dict, problems: list) -> list[dict] | None:
        if "conversations" not in rec or rec["conversations"] is None:
            problems.append((None, "missing 'conversations'"))
            return None
        convs = rec["conversations"]
        if not isinstance(convs, list):
            problems.append((None, f"'conversations' must be a list of turns, got "
                                   f"{type(convs).__name__}"))
            return None
        if not convs:
            problems.append((None, "empty 'conversations'"))
            return None
        turns: list[dict] = []
        ok = True
        for i, turn in enumerate(convs):
            if not isinstance(turn, dict):
                problems.append((None, f"turn {i} is not an object with 'from' and 'value'"))
                ok = False
                continue
            role = turn.get("from", turn.get("role"))
            role = ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
            if role is None:
                problems.append((None, f"turn {i}: 'from' is {turn.get('from')!r}; expected "
                                       f"'human' or 'gpt' (or 'user'/'assistant', or a first "
                                       f"'system' turn)"))
                ok = False
                continue
            value = turn.get("value")
            if not isinstance(value, str):
                problems.append((None, f"turn {i} ({role}): 'value' must be a string, got "
                                       f"{type(value).__name__}"))
                ok = False
                continue
            turns.append({"from": role, "value": value})
        if not ok:
            return None
        body = turns[1:] if turns[0]["from"] == "system" else turns
        offset = len(turns) - len(body)
        if not body:
            problems.append((None, "'conversations' has no human/gpt turns"))
            return None
        for j, turn in enumerate(body):
            expected = "human" if j % 2 == 0 else "gpt"
            if turn["from"] != expected:
                what = ("a second 'system' turn (only a first one is allowed)"
                        if turn["from"] == "system" else f"a {turn['from']} turn")
                problems.append((None, f"turn {j + offset}: expected a {expected} turn, got "
                                       f"{what}; turns must alternate human, gpt, ..."))
                return None
        if body[-1]["from"] != "gpt":
            problems.append((None, f"the last turn (turn {len(turns) - 1}) is a human turn; "
                                   f"a sample must end with the gpt answer"))
            return None
        for j, turn in enumerate(turns):
            if turn["from"] == "gpt" and not turn["value"].strip():
                last = j == len(turns) - 1
                problems.append((None, ("empty final answer" if last else "empty answer") +
                                 f" (turn {j})"))
        for j, turn in enumerate(turns):
            if turn["from"] != "human":
                found = find_placeholders(turn["value"], self.pattern)
                if found:
                    problems.append((None, f"turn {j} ({turn['from']}) contains the placeholder "
                                           f"{found[0]!r}; placeholders belong in human turns"))
        return turns

    def _media(self, rec: dict, problems: list
               ) -> tuple[dict[str, list[Path]] | None, dict[str, int]]:
        """The resolved files (None if any is bad) and how many files each modality lists."""
        media: dict[str, list[Path]] = {}
        listed: dict[str, int] = {}
        ok = True
        for key, modality in self.key_to_modality.items():
            if key not in rec or rec[key] is None:
                listed[modality] = 0
                continue
            value = rec[key]
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                problems.append((None, f"{key!r} must be a path or a list of paths, got "
                                       f"{json.dumps(value)[:80]}"))
                ok = False
                continue
            listed[modality] = len(values)
            paths = []
            for v in values:
                p = self._resolve(key, v, problems)
                if p is None:
                    ok = False
                else:
                    paths.append(p)
            media[modality] = paths
        return (media if ok else None), listed

    def _resolve(self, key: str, value: str, problems: list) -> Path | None:
        if not value.strip():
            problems.append((None, f"{key!r}: empty path"))
            return None
        if "\x00" in value:
            problems.append((value, f"{key!r}: path contains a NUL byte"))
            return None
        joined = os.path.normpath(os.path.join(self.root, value))
        try:
            inside = os.path.commonpath([joined, str(self.root)]) == str(self.root)
        except ValueError:  # different drives
            inside = False
        if not inside:
            kind = "absolute path" if os.path.isabs(value) else "path"
            problems.append((value, f"{key!r}: {kind} {value!r} escapes the data root "
                                    f"{self.root} (media paths must stay inside the root)"))
            return None
        path = Path(joined).resolve()
        if not _inside(path, self.real_root):
            problems.append((value, f"{key!r}: {value!r} is a symlink (or lies under one) that "
                                    f"points outside the data root {self.root}: {path}"))
            return None
        if not path.is_file():
            reason = "is a directory, not a file" if path.is_dir() else "media file missing"
            problems.append((str(path), f"{key!r}: {reason}: {path}"))
            return None
        return path

    def _counts(self, turns: list[dict], listed: dict[str, int], problems: list) -> None:
        counts: dict[str, int] = {}
        for turn in turns:
            if turn["from"] == "human":
                for ph in find_placeholders(turn["value"], self.pattern):
                    m = self.placeholder_to_modality[ph]
                    counts[m] = counts.get(m, 0) + 1
        modality_to_key = {m: k for k, m in self.key_to_modality.items()}
        for modality, key in modality_to_key.items():
            if modality not in listed:  # its value is not a path list: already reported
                continue
            n_files = listed[modality]
            n_ph = counts.get(modality, 0)
            if n_files != n_ph:
                ph = next(p for p, m in self.placeholder_to_modality.items() if m == modality)
                problems.append((None, f"{n_ph} {ph!r} placeholder(s) in the human turns but "
                                       f"{n_files} file(s) under {key!r}"))


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------
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

"""Validating one manifest record: keys, conversations, placeholders, media paths inside the data
root (see :mod:`mil_plugins.data.manifest`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from mil_plugins.data.manifest_read import _BadLine
from mil_plugins.data.samples import (BASE_KEYS, COMMON_MODALITY_KEYS, METADATA_KEYS, ROLE_ALIASES,
                                      Sample, find_placeholders, placeholder_regex,
                                      plugin_manifest_key)


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

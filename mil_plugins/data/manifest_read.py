"""Reading a manifest file into records: a JSON list or JSONL, UTF-8, duplicate keys remembered
(see :mod:`mil_plugins.data.manifest`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mil_plugins.data.errors import DataError
from mil_plugins.data.samples import JSONL_SUFFIXES


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




class _JSONObject(dict):
    """A JSON object that remembers keys given twice (``json`` keeps only the last)."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict:
    obj = _JSONObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj.duplicates = tuple(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj

"""A manifest of file checksums for a directory (checkpoints, saved models), written last.

``write_checksums(dir)`` records the SHA-256 of every file under ``dir`` in ``dir/checksums.json``;
it is the last file written, so a directory with a complete manifest was written completely.
``verify_checksums(dir)`` recomputes them and raises :class:`ChecksumError` naming the first file
that is missing or does not match (a truncated, corrupted or edited file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mil_plugins.atomic import atomic_write_json

CHECKSUMS = "checksums.json"
_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A file of a checksummed directory is missing, changed or not listed; names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS and ".tmp-" not in p.name)


def write_checksums(directory: Path) -> Path:
    """Write ``directory/checksums.json`` (relative path -> sha256) for every file under it."""
    directory = Path(directory)
    sums = {p.relative_to(directory).as_posix(): sha256_file(p) for p in _files(directory)}
    return atomic_write_json(directory / CHECKSUMS, {"sha256": sums})


def read_checksums(directory: Path) -> dict[str, str] | None:
    """The recorded checksums, or ``None`` when the directory has no manifest (older format)."""
    path = Path(directory) / CHECKSUMS
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        sums = data["sha256"]
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise TypeError("sha256 is not a mapping of file -> hex digest")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ChecksumError(f"{path}: unreadable checksum manifest ({type(exc).__name__}: {exc})") \
            from None
    return sums


def verify_checksums(directory: Path, required: bool = False) -> bool:
    """Check every recorded file; ``False`` if there is no manifest (and it is not ``required``)."""
    directory = Path(directory)
    sums = read_checksums(directory)
    if sums is None:
        if required:
            raise ChecksumError(f"{directory / CHECKSUMS}: missing (the directory was not written "
                                f"completely, or by an older version)")
        return False
    for rel, digest in sums.items():
        path = directory / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ChecksumError(f"{directory / CHECKSUMS}: lists a path outside the directory: {rel!r}")
        if not path.is_file():
            raise ChecksumError(f"{path}: missing (listed in {CHECKSUMS})")
        if sha256_file(path) != digest:
            raise ChecksumError(f"{path}: contents do not match {CHECKSUMS} (the file is corrupt, "
                                f"truncated or was edited)")
    listed = set(sums)
    for path in _files(directory):
        if path.relative_to(directory).as_posix() not in listed:
            raise ChecksumError(f"{path}: not listed in {CHECKSUMS} (added after the directory was "
                                f"written)")
    return True

"""Atomic file and directory writes: a crash never leaves a half-written file, and never loses
what was already there.

Every writer follows the same recipe: write a temporary sibling in the *same directory* (so the
final ``os.replace`` is a rename within one file system, which POSIX makes atomic), flush and
``fsync`` it, ``os.replace`` it onto the target, then ``fsync`` the directory so the rename itself
is durable. If anything raises before the rename, the temporary file is removed and the old
target is untouched.

    atomic_write_bytes(path, data)
    atomic_write_text(path, text, encoding="utf-8")
    atomic_write_json(path, obj)                  # indent=2, NaN/inf -> null, Path -> str
    atomic_save_safetensors(path, tensors, metadata=None)
    with atomic_dir(path) as tmp: ...            # build a directory, swap it in at the end
    recover_dir(path)                             # finish a swap a crash interrupted

Temporary names start with ``.`` and contain ``.tmp-`` (files and directories being written) or
``.old-`` (a directory being replaced), so they are easy to recognise and never collide with the
names this project writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "atomic_dir",
    "recover_dir",
    "to_jsonable",
]


def _fsync_dir(directory: Path) -> None:
    """Make a rename/creation inside ``directory`` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_file(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    return fd, Path(tmp)


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_via_temp(path: Path, write: Callable[[int, Path], None]) -> Path:
    """A temp sibling of ``path`` that ``write(fd, tmp)`` fills and fsyncs (closing ``fd``), then
    given the default permissions and ``os.replace``d over ``path``; removed if anything fails."""
    fd, tmp = _tmp_file(path)
    try:
        write(fd, tmp)
        _chmod_default(tmp)
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp sibling, fsync, ``os.replace``). Returns the path."""

    def write(fd: int, tmp: Path) -> None:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return _write_via_temp(Path(path), write)


def _read_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe later.
_UMASK = _read_umask()


def _chmod_default(p: Path) -> None:
    # mkstemp creates 0600; give the file the permissions a plain open() would.
    with contextlib.suppress(OSError):
        os.chmod(p, 0o666 & ~_UMASK)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON can hold.

    NaN and +-inf become ``None`` (JSON has no such numbers); ``Path`` becomes ``str``; tuples and
    sets become lists; numpy / torch scalars and arrays become Python numbers and lists; mapping
    keys become strings. Anything else unknown raises ``TypeError``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, str) else k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=repr)]
    # numpy / torch without importing them
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return to_jsonable(tolist())
    item = getattr(obj, "item", None)
    if callable(item):
        return to_jsonable(item())
    raise TypeError(f"cannot write {type(obj).__name__} as JSON: {obj!r}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (indent=2, keys in insertion order, trailing newline) atomically.

    NaN / inf are written as ``null`` (see :func:`to_jsonable`), so the file is strict JSON.
    """
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                            metadata: Mapping[str, Any] | None = None) -> Path:
    """Save a ``{name: torch.Tensor}`` dict as safetensors atomically.

    Tensors are made contiguous (safetensors requires it); tensors that share storage are cloned
    so safetensors does not refuse them. ``metadata`` values that are not strings are JSON-encoded
    (safetensors metadata is ``str -> str``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    prepared: dict[str, Any] = {}
    seen_storage: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"safetensors keys must be str, got {type(name).__name__}: {name!r}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if key is not None and key in seen_storage:
            t = t.clone()
        elif key is not None:
            seen_storage.add(key)
        prepared[name] = t.contiguous()
    meta = None
    if metadata is not None:
        meta = {str(k): v if isinstance(v, str) else json.dumps(to_jsonable(v)) for k, v in metadata.items()}

    def write(fd: int, tmp: Path) -> None:
        os.close(fd)
        save_file(prepared, str(tmp), metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    return _write_via_temp(path, write)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with contextlib.suppress(OSError):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _old_siblings(path: Path) -> list[Path]:
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}.old-"
    olds = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    return sorted(olds, key=lambda p: p.stat().st_mtime)


def recover_dir(path: str | os.PathLike) -> bool:
    """Finish a directory swap that a crash interrupted; return True if something was restored.

    :func:`atomic_dir` replaces an existing directory in three steps (rename old away, rename new
    in, delete old). A crash between the first two leaves ``path`` missing and the previous
    content under ``.<name>.old-*``: this renames the newest such directory back. If ``path``
    exists, leftover ``.old-`` directories are complete copies of superseded content and are
    deleted. Temporary ``.tmp-`` directories are never touched here (one may belong to a writer
    still running).
    """
    path = Path(path)
    olds = _old_siblings(path)
    restored = False
    if not path.exists() and olds:
        os.replace(olds.pop(), path)
        _fsync_dir(path.parent)
        restored = True
    if path.exists():
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)
    return restored


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary sibling name and move it to ``path`` at the end.

    ::

        with atomic_dir(run_dir / "checkpoints" / "stage2") as tmp:
            atomic_save_safetensors(tmp / "adapter.safetensors", state)
            atomic_write_json(tmp / "meta.json", meta)

    If the block raises, the temporary directory is deleted and whatever was at ``path`` before
    is left as it was. On success, every file in the new directory is fsynced; then an existing
    ``path`` is renamed away (``.<name>.old-*``), the new directory renamed in, and the old one
    deleted. Only the instant between the two renames has no ``path``; :func:`recover_dir`
    (called on entry here too) puts the old directory back after a crash in that instant.
    Concurrent ``atomic_dir`` calls on the same ``path`` are not supported.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old: Path | None = None
    try:
        yield tmp
        _fsync_tree(tmp)
        _chmod_dir_default(tmp)
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)  # we only wanted a unique name
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if old is not None and not (path.exists() or path.is_symlink()):
            with contextlib.suppress(OSError):
                os.replace(old, path)  # put the previous content back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def _chmod_dir_default(p: Path) -> None:
    # mkdtemp creates 0700; give the directory the permissions a plain mkdir() would.
    with contextlib.suppress(OSError):
        os.chmod(p, 0o777 & ~_UMASK)


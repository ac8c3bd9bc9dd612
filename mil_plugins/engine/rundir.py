"""A run owns its output folder: a lock held by the live process, no silent mixing of two runs.

    folder = RunFolder(out)
    with folder.claim(resume=..., overwrite=..., main=is_main):   # acquire on the main rank ...
        setup()                                 # ... and release again if the setup fails
    ...
    folder.release()                            # at exit (the OS releases it if the process dies)

* The lock is ``OUT/.mil-run.lock``, held with ``fcntl.flock`` on an open file for the life of the
  process: a second run into the same folder is refused with the first one's pid, host and start
  time. A lock file left by a killed run is not held by anyone: it is stale and taken over.
* A fresh run (no ``--resume``) into a folder that holds another run's results (checkpoints,
  metrics, report) is refused unless ``--overwrite`` is given; ``--overwrite`` removes those
  results first, so no later-stage checkpoint of the old run is left beside the new ones.
* Temporary files and folders that killed atomic writes left behind (``.*.tmp-*``) are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK = ".mil-run.lock"
#: what a run writes into its folder (the feature cache is shared safely and kept)
RESULTS = ("checkpoints", "metrics.json", "report.md", "logs", "tensorboard",
           "accuracy_matrix.png", "accuracy_curves.png")


class RunFolderError(ValueError):
    """The output folder cannot be used by this run; the message says why and what to do."""


def _describe(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}"


def leftover_temporaries(out: Path) -> list[Path]:
    """``.*.tmp-*`` files and folders under ``out`` (not descending into the feature cache's
    shards or into what is removed anyway)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(out):
        for name in list(dirnames) + filenames:
            if name.startswith(".") and ".tmp-" in name:
                found.append(Path(dirpath) / name)
        dirnames[:] = [d for d in dirnames if not (d.startswith(".") and ".tmp-" in d)]
    return found


class RunFolder:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.lock_path = self.out / LOCK
        self._fd: int | None = None

    def results(self) -> list[str]:
        """Names of earlier run results in the folder."""
        found = []
        for name in RESULTS:
            p = self.out / name
            if p.is_file() or (p.is_dir() and any(p.iterdir())):
                found.append(name)
        return found

    def acquire(self, resume: bool = False, overwrite: bool = False) -> list[Path]:
        """Lock the folder, refuse or clear another run's results, remove leftovers.

        Returns the temporary leftovers that were removed."""
        import fcntl

        if self.out.exists() and not self.out.is_dir():
            raise RunFolderError(f"output.dir {self.out} is a file, not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunFolderError(
                f"{self.out} is in use by another run ({_describe(self._read_info())}); wait for "
                f"it to finish or choose another output.dir") from None
        self._fd = fd
        try:
            self._check_results(resume, overwrite)
            removed = leftover_temporaries(self.out)
            for p in removed:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException:
            self.release()
            raise
        return removed

    @contextlib.contextmanager
    def claim(self, resume: bool = False, overwrite: bool = False, main: bool = True):
        """``with folder.claim(...): setup()``: acquire the folder (on the main rank only, saying
        what killed writes left behind) and release it again if the body raises; on success it
        stays held until :meth:`release`."""
        if main:
            removed = self.acquire(resume=resume, overwrite=overwrite)
            if removed:
                print(f"[mil] removed {len(removed)} temporary file(s) a killed write left in "
                      f"{self.out}")
        try:
            yield self
        except BaseException:
            self.release()
            raise

    def _check_results(self, resume: bool, overwrite: bool) -> None:
        results = self.results()
        if not results or resume:
            return
        if not overwrite:
            raise RunFolderError(
                f"{self.out} holds another run's results ({', '.join(results)}); continue it with "
                f"--resume, start over with --overwrite (deletes them), or choose another output.dir")
        for name in results:
            p = self.out / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    def _read_info(self) -> dict:
        try:
            return json.loads(self.lock_path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the flock

"""Expensive test inputs built once and shared: by every test of a session, by the pytest-xdist
workers of a run (a file lock: one worker builds, the others wait and then read), and by later
runs on the same checkout (the cache lives in ``.pytest_cache/mil-shared`` or ``$MIL_TEST_CACHE``).

Every entry is keyed by what makes it: the arguments that build it and the source of the code that
builds it (a change to the benchmark generator, say, gives a new key), so a stale entry is never
read. An entry is complete only once its ``.complete`` marker exists; a build that was killed
leaves an incomplete folder that the next build replaces (the lock is the operating system's and
goes with the process that held it).

Entries are read-only by convention: a test that writes into one works on a copy
(:func:`copy_of`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
COMPLETE = ".complete"


def cache_root() -> Path:
    root = Path(os.environ.get("MIL_TEST_CACHE") or ROOT / ".pytest_cache" / "mil-shared")
    root.mkdir(parents=True, exist_ok=True)
    return root


def source_digest(paths: Iterable[Path]) -> str:
    """sha256 over the ``.py`` files under ``paths`` (names and contents, in a fixed order)."""
    h = hashlib.sha256()
    for base in paths:
        files = sorted(base.rglob("*.py")) if base.is_dir() else [base]
        for f in files:
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def entry(name: str, key: dict, sources: Iterable[Path], build: Callable[[Path], None]) -> Path:
    """The folder ``build(folder)`` fills for ``key``, built at most once per key and source."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()
                            + source_digest(sources).encode()).hexdigest()[:16]
    root = cache_root()
    folder = root / f"{name}-{digest}"
    if (folder / COMPLETE).exists():
        return folder
    with FileLock(str(root / f"{name}-{digest}.lock")):
        if (folder / COMPLETE).exists():  # another worker built it while we waited
            return folder
        if folder.exists():  # a build that was killed
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        build(folder)
        (folder / COMPLETE).write_text(json.dumps(key, sort_keys=True, default=str))
    return folder


BENCHMARK_SOURCES = (ROOT / "mil_plugins" / "benchmark",)


def benchmark(size: str = "tiny", seed: int = 0, modalities: Iterable[str] | None = None,
              sequence: str = "modality") -> Path:
    """A generated benchmark (``make_benchmark``'s arguments), shared read-only."""
    from importlib.metadata import version

    mods = None if modalities is None else sorted(modalities)
    key = {"size": size, "seed": seed, "modalities": mods, "sequence": sequence,
           # the writers of its files
           "libraries": {name: version(name) for name in ("numpy", "pillow", "av", "soundfile")}}

    def build(folder: Path) -> None:
        from mil_plugins.benchmark import make_benchmark

        make_benchmark(folder, size=size, seed=seed, modalities=mods, sequence=sequence)

    return entry("benchmark", key, BENCHMARK_SOURCES, build)


def copy_of(src: Path, dst: Path) -> Path:
    """A writable copy of a shared entry, for a test that writes into its folder."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(COMPLETE))
    return dst


def torch_extensions() -> str:
    """A ``TORCH_EXTENSIONS_DIR`` holding DeepSpeed's CPU shared-memory allreduce op, built once
    (about 40 s on 2 cores) for every DeepSpeed launch of the run, and of later runs with the same
    torch, DeepSpeed, Python and CPU (the op is compiled for the CPU it is built on). Each launch
    used to JIT-build it into a fresh folder of its own."""
    import subprocess
    import sys

    import deepspeed
    import torch

    from mil_plugins.machine import cpuinfo

    key = {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
           "python": sys.version.split()[0], "cpu_flags": sorted(cpuinfo()[1])}

    def build(folder: Path) -> None:
        code = ("from deepspeed.accelerator import get_accelerator; "
                "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(folder)}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"building DeepSpeed's shm op failed:\n{proc.stderr[-4000:]}")

    return str(entry("torch-extensions", key, (), build))

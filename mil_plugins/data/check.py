"""``mil check-data``: find every bad sample of a manifest before training does.

Two passes: the structural checks of :func:`~mil_plugins.data.manifest.load_manifest` (every
problem of every sample, none stops the run), then every media file of the structurally good samples
through its plugin's ``preprocess`` in a process pool (each file once, however many samples use it).
"""

from __future__ import annotations

import concurrent.futures as cf
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TextIO

import torch

from mil_plugins.data.errors import DataError
from mil_plugins.data.manifest import load_manifest
from mil_plugins.modality import ModalityInputError

CHUNK = 16  # files per task sent to a worker


@dataclass
class BadSample:
    id: str | None
    index: int
    problems: list[tuple[str | None, str]]   # (file or None, reason)
    structural: bool = False                  # found reading the manifest (training skips it with
                                              # on_error: skip); else a media file or the metric

    @property
    def file(self) -> str | None:
        return next((f for f, _ in self.problems if f), None)

    @property
    def reason(self) -> str:
        return "; ".join(_problem_text(f, r) for f, r in self.problems)

    def line(self) -> str:
        label = self.id if self.id is not None else f"(no id, index {self.index})"
        return f"{label}: {self.reason}"


def _problem_text(file: str | None, reason: str) -> str:
    return f"{file}: {reason}" if file and file not in reason else reason


@dataclass
class CheckReport:
    manifest: Path
    total: int
    bad: list[BadSample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    @property
    def num_good(self) -> int:
        return self.total - len(self.bad)

    def format(self) -> str:
        lines = [b.line() for b in self.bad]
        lines.append(f"{self.total} samples, {len(self.bad)} bad")
        return "\n".join(lines)


# -- the worker side ------------------------------------------------------------------------------
_WORKER_PLUGINS: dict[Any, Any] = {}


def _init_worker() -> None:
    torch.set_num_threads(1)


def _preprocess_chunk(cls: type, options: dict, paths: list[str]) -> list[str | None]:
    """Preprocess each file; ``None`` if fine, else the reason."""
    key = (cls, pickle.dumps(options))
    plugin = _WORKER_PLUGINS.get(key)
    if plugin is None:
        plugin = _WORKER_PLUGINS[key] = cls(**options)
    return [_try_preprocess(plugin, p) for p in paths]


def _try_preprocess(plugin: Any, path: str) -> str | None:
    try:
        out = plugin.preprocess(path)
    except ModalityInputError as exc:
        return exc.problem
    except Exception as exc:  # a plugin bug or an unexpected decoder error: still a bad file
        return f"{type(exc).__name__}: {exc}"
    if not isinstance(out, torch.Tensor):
        return f"preprocess returned {type(out).__name__}, not a tensor"
    return None


# -- the driver ----------------------------------------------------------------------------------
def _picklable(obj: Any) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:
        return False


def check_media(files: Mapping[str, list[str]], plugins: Mapping[str, Any], workers: int = 2
                ) -> dict[tuple[str, str], str | None]:
    """``(modality, path) -> None | reason`` for every file, preprocessed by ``workers``
    processes (in this process when ``workers <= 1`` or a plugin cannot be pickled)."""
    results: dict[tuple[str, str], str | None] = {}
    jobs = []
    for modality, paths in files.items():
        plugin = plugins[modality]
        cls = plugin if isinstance(plugin, type) else type(plugin)
        options = {} if isinstance(plugin, type) else dict(plugin.options)
        for k in range(0, len(paths), CHUNK):
            jobs.append((modality, cls, options, paths[k:k + CHUNK]))
    remote, local = [], []
    for job in jobs:
        (remote if workers > 1 and _picklable((job[1], job[2])) else local).append(job)
    for modality, cls, options, paths in local:
        for path, reason in zip(paths, _preprocess_chunk(cls, options, paths)):
            results[(modality, path)] = reason
    if remote:
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(remote)),
                                    initializer=_init_worker) as pool:
            futures = {pool.submit(_preprocess_chunk, cls, options, paths): (modality, paths)
                       for modality, cls, options, paths in remote}
            for future in cf.as_completed(futures):
                modality, paths = futures[future]
                try:
                    reasons = future.result()
                except Exception as exc:  # the worker died (e.g. a decoder crashed the process)
                    reasons = [f"the checking process failed: {type(exc).__name__}: {exc}"] * len(paths)
                for path, reason in zip(paths, reasons):
                    results[(modality, path)] = reason
    return results


def check_manifest(manifest: str | Path, root: str | Path | None = None,
                   plugins: Mapping[str, Any] | None = None, workers: int = 2,
                   decode: bool = True) -> CheckReport:
    """Every structural problem and every unreadable media file of ``manifest``.

    ``plugins``: modality name -> plugin instance (or class, default options); ``decode=False``
    skips the media pass (structure and metrics only). A manifest that
    cannot be read as a whole (not UTF-8, invalid JSON) raises :class:`DataError`.
    """
    plugins = dict(plugins or {})
    data = load_manifest(manifest, root, plugins, on_error="skip")
    bad = [BadSample(s.id, s.index, list(s.problems) or [(s.file, s.reason)], structural=True)
           for s in data.skipped]
    files: dict[str, list[str]] = {}
    for sample in data.samples:
        for modality, paths in sample.media.items():
            known = files.setdefault(modality, [])
            known.extend(str(p) for p in paths)
    files = {m: list(dict.fromkeys(ps)) for m, ps in files.items()}
    results = check_media(files, plugins, workers) if decode else {}
    from mil_plugins.scoring import METRICS

    for sample in data.samples:
        problems = [(str(p), results[(m, str(p))]) for m, paths in sample.media.items()
                    for p in paths if results.get((m, str(p)))]
        if sample.metric is not None and sample.metric not in METRICS:
            problems.append((None, f"unknown metric {sample.metric!r}; valid metrics: "
                                   f"{', '.join(METRICS)}"))
        if problems:
            bad.append(BadSample(sample.id, sample.index, problems))
    bad.sort(key=lambda b: b.index)
    return CheckReport(data.path, len(data.samples) + len(data.skipped), bad)


def installed_plugins() -> tuple[dict[str, Any], dict[str, str]]:
    """Every loadable modality plugin of the registry with default options, and the failures."""
    from mil_plugins.plugins import MODALITIES

    plugins: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for name in MODALITIES.names():
        try:
            plugins[name] = MODALITIES.get(name)()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin's constructor may even call sys.exit
            failed[name] = f"{type(exc).__name__}: {exc}"
    return plugins, failed


def run_check_data(manifest: str | Path, root: str | Path | None = None, workers: int = 2,
                   out: TextIO | None = None) -> int:
    """``mil check-data``: print the report; exit code 0 if every sample is good, else 1 (also
    when the manifest cannot be read at all: the error is printed)."""
    out = out if out is not None else sys.stdout
    plugins, failed = installed_plugins()
    for name, why in failed.items():
        print(f"note: modality plugin {name!r} is not available, samples using it will be "
              f"reported: {why}", file=out)
    try:
        report = check_manifest(manifest, root, plugins, workers)
    except DataError as exc:
        print(f"error: {exc}", file=out)
        return 1
    print(report.format(), file=out)
    if root is None and report.bad and all("media file missing" in b.reason for b in report.bad):
        print(f"note: media paths were resolved from the manifest's folder "
              f"{Path(manifest).absolute().parent}; training resolves them from the recipe's "
              f"data.root: give --root DATA_ROOT, or check what a run reads with "
              f"`mil check-data RECIPE`", file=out)
    return 0 if report.ok else 1

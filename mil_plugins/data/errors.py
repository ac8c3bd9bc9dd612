"""The one error type of the data package."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A manifest, a sample or a media file cannot be used.

    The message names the manifest, the sample (its id, or its index when it has none) and the
    problem; the parts are also kept as attributes for programs.
    """

    def __init__(self, problem: str, *, manifest: str | Path | None = None,
                 sample_id: str | None = None, index: int | None = None,
                 file: str | Path | None = None):
        self.problem = problem
        self.manifest = str(manifest) if manifest is not None else None
        self.sample_id = sample_id
        self.index = index
        self.file = str(file) if file is not None else None
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.manifest:
            where.append(self.manifest)
        if self.sample_id is not None:
            where.append(f"sample {self.sample_id!r}" +
                         (f" (index {self.index})" if self.index is not None else ""))
        elif self.index is not None:
            where.append(f"sample at index {self.index} (no id)")
        if self.file and self.file not in self.problem:
            where.append(self.file)
        return ": ".join(where + [self.problem])

    def with_context(self, *, manifest=None, sample_id=None, index=None, file=None) -> "DataError":
        """A copy with missing context filled in (context already set wins)."""
        return DataError(self.problem,
                         manifest=self.manifest or manifest,
                         sample_id=self.sample_id if self.sample_id is not None else sample_id,
                         index=self.index if self.index is not None else index,
                         file=self.file or file)

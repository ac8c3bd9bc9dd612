"""The error of a bad recipe (re-exported by :mod:`mil_plugins.recipe`)."""

from __future__ import annotations

from pathlib import Path


class RecipeError(ValueError):
    """A recipe problem; the message names the file and the key path."""

    def __init__(self, source: str | Path, key: str, problem: str):
        self.source, self.key, self.problem = str(source), key, problem
        where = f" at {key}" if key else ""
        super().__init__(f"{source}{where}: {problem}")

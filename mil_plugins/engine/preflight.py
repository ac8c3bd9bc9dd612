"""Preflight: before the first stage trains, check everything the run will read.

Every manifest of the recipe (the warm-up's, each stage's train and test split) is read with the
recipe's data root and modality options, each media file goes through its plugin's ``preprocess``
in worker processes, and each sample's metric is checked: exactly what ``mil check-data RECIPE``
prints, with the same lines. A run whose fifth stage cannot be read stops here, before the first
stage trains, instead of after four.

Structurally bad samples are an error only with ``data.on_error: raise`` (with ``skip`` training
leaves them out and counts them); an unreadable media file or an unknown metric always is, because
training would stop on it. ``data.preflight``: ``full`` (default: every media file decoded, in
worker processes), ``manifests`` (structure and metrics only, no decoding) or ``off``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

from mil_plugins.data.check import CheckReport, check_manifest
from mil_plugins.data.errors import DataError
from mil_plugins.engine.resume import manifests_of


class PreflightError(ValueError):
    """The data a run would read has problems; the message names the manifest and a sample."""


def recipe_plugins(recipe: dict) -> dict[str, Any]:
    from mil_plugins.plugins import MODALITIES

    return {name: MODALITIES.get(name)(**(opts or {})) for name, opts in recipe["modalities"].items()}


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def check_recipe_data(recipe: dict, workers: int | None = None, decode: bool = True
                      ) -> list[CheckReport]:
    """A :class:`CheckReport` per manifest of ``recipe``; a manifest that cannot be read at all
    raises :class:`DataError` naming it."""
    root = Path(recipe["data"]["root"])
    plugins = recipe_plugins(recipe)
    reports = []
    for name in manifests_of(recipe):
        path = Path(name) if Path(name).is_absolute() else root / name
        if not path.is_file():
            raise DataError("manifest not found" if not path.exists() else "is not a file",
                            manifest=path)
        reports.append(check_manifest(path, root, plugins,
                                      workers if workers is not None else default_workers(),
                                      decode=decode))
    return reports


def _blocking(report: CheckReport, on_error: str):
    """The bad samples that would stop training."""
    if on_error == "raise":
        return report.bad
    return [b for b in report.bad if not b.structural]


def preflight(recipe: dict, workers: int | None = None) -> list[CheckReport]:
    """Raise :class:`PreflightError` (one line) if the run would stop on its data; else return
    the reports (samples that ``on_error: skip`` will leave out are in them)."""
    if recipe["data"]["preflight"] == "off":
        return []
    try:
        reports = check_recipe_data(recipe, workers, decode=recipe["data"]["preflight"] == "full")
    except DataError as exc:
        raise PreflightError(f"preflight: {exc}") from None
    on_error = recipe["data"]["on_error"]
    for report in reports:
        blocking = _blocking(report, on_error)
        if blocking:
            raise PreflightError(
                f"preflight: {report.manifest}: {len(blocking)} bad sample(s) of {report.total}; "
                f"first: {blocking[0].line()} (`mil check-data "
                f"{recipe.get('_source', 'RECIPE')}` lists them all)")
    try:
        check_answer_choices(recipe)
    except DataError as exc:
        raise PreflightError(f"preflight: {exc}") from None
    return reports


def check_answer_choices(recipe: dict) -> None:
    """With ``eval.choices: sample``, every exact-match test sample lists its answer choices
    (``options``) and its answer is one of them; else :class:`DataError` naming the first that
    does not (found now, not when the stage is evaluated after training)."""
    if recipe["eval"].get("choices") != "sample":
        return
    from mil_plugins.choices import CLOSED_SET_METRICS, metric_of, own_options
    from mil_plugins.data.manifest import load_manifest

    root = Path(recipe["data"]["root"])
    plugins = recipe_plugins(recipe)
    for stage in recipe["stages"]:
        if not stage.get("test"):
            continue
        path = Path(stage["test"]) if Path(stage["test"]).is_absolute() else root / stage["test"]
        for sample in load_manifest(path, root, plugins, on_error="skip").samples:
            if metric_of(sample) in CLOSED_SET_METRICS:
                own_options(sample)


def run_check_recipe(path: str | Path, overrides: list[str], workers: int | None = None,
                     out: TextIO | None = None) -> int:
    """``mil check-data RECIPE [key=value ...]``: every manifest the run reads; exit 0 if all good."""
    from mil_plugins.recipe import load_recipe

    out = out if out is not None else sys.stdout
    recipe = load_recipe(path, overrides)
    try:
        reports = check_recipe_data(recipe, workers)
    except DataError as exc:
        print(f"error: {exc}", file=out)
        return 1
    bad = 0
    for report in reports:
        print(f"== {report.manifest}", file=out)
        print(report.format(), file=out)
        bad += len(report.bad)
    print(f"{len(reports)} manifest(s) of {path}, {bad} bad sample(s) "
          f"(data.on_error: {recipe['data']['on_error']})", file=out)
    return 0 if bad == 0 else 1

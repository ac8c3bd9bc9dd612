"""tools/compare.py reuses a finished run only when it is a run of the recipe given now."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mil_plugins.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "quickstart.yaml")


@pytest.fixture()
def compare_tool(monkeypatch):
    spec = importlib.util.spec_from_file_location("compare_tool", ROOT / "tools" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []
    monkeypatch.setattr(module.subprocess, "run", lambda command, **kw: calls.append(command))
    return module, calls


def finished_run(out: Path, recipe: dict) -> None:
    (out / "checkpoints" / "last").mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"completed_stages": len(recipe["stages"])}))
    (out / "checkpoints" / "last" / "recipe.json").write_text(json.dumps(recipe))


def resolved(out: Path, *overrides: str) -> dict:
    return load_recipe(RECIPE, [*overrides, "train.seed=0", f"output.dir={out}"])


def test_a_finished_run_of_the_same_recipe_is_reused(compare_tool, tmp_path):
    module, calls = compare_tool
    out = tmp_path / "finetune" / "seed-0"
    saved = resolved(out)
    # what encoder pretraining writes into the run's own recipe is not a change
    saved["modalities"]["image"]["encoder_weights"] = "data/x/encoders/image-0.safetensors"
    assert saved["modalities"]["video"] == {}  # a modality with no options of its own
    saved["modalities"]["video"]["encoder_weights"] = "data/x/encoders/video-0.safetensors"
    finished_run(out, saved)
    assert module.run_one(RECIPE, [], 0, out, rerun=False) == out
    assert calls == []
    module.run_one(RECIPE, [], 0, out, rerun=True)
    assert len(calls) == 1


def test_a_run_saved_before_a_null_default_key_existed_is_reused(compare_tool, tmp_path):
    """A key added to the schema later with a null default (train.data_seed) is no change."""
    module, calls = compare_tool
    out = tmp_path / "finetune" / "seed-0"
    saved = resolved(out)
    assert saved["train"]["data_seed"] is None
    del saved["train"]["data_seed"]
    finished_run(out, saved)
    assert module.run_one(RECIPE, [], 0, out, rerun=False) == out and calls == []
    # a value that is not null is a change
    finished_run(tmp_path / "other", resolved(tmp_path / "other", "train.data_seed=3"))
    module.run_one(RECIPE, [], 0, tmp_path / "other", rerun=False)
    assert len(calls) == 1


def test_a_finished_run_of_another_recipe_is_run_again(compare_tool, tmp_path, capsys):
    module, calls = compare_tool
    out = tmp_path / "finetune" / "seed-0"
    finished_run(out, resolved(out, "train.lr=0.5"))
    module.run_one(RECIPE, [], 0, out, rerun=False)
    assert len(calls) == 1 and "--overwrite" in calls[0]
    printed = capsys.readouterr().out
    assert "its recipe differs" in printed and "train.lr" in printed


def test_a_finished_run_without_its_recipe_is_run_again(compare_tool, tmp_path, capsys):
    module, calls = compare_tool
    out = tmp_path / "finetune" / "seed-0"
    finished_run(out, resolved(out))
    (out / "checkpoints" / "last" / "recipe.json").unlink()
    module.run_one(RECIPE, [], 0, out, rerun=False)
    assert len(calls) == 1 and "was not saved" in capsys.readouterr().out

"""Encoders pretrained once on labelled data of their modality (``encoder_pretraining``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mil_plugins.benchmark import make_benchmark
from mil_plugins.data.manifest import load_manifest
from mil_plugins.engine.encoder_pretraining import (TaskHeads, apply_encoder_pretraining,
                                                    labelled_inputs, pretrain_encoder,
                                                    pretrained_weights)
from mil_plugins.modality import ENCODER_WEIGHTS
from mil_plugins.plugins import MODALITIES
from mil_plugins.recipe import load_recipe
from mil_plugins.recipe.load import RecipeError

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"steps": 8, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.0, "seed": 0}


@pytest.fixture(scope="module")
def pre_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain_data")
    make_benchmark(out, size="tiny", seed=1, modalities=["image", "audio"])
    return out


def _recipe(pre_root: Path, tmp_path: Path, *extra: str) -> dict:
    return load_recipe(ROOT / "recipes" / "quickstart.yaml", [
        f"data.root={tmp_path / 'bench'}", f"output.dir={tmp_path / 'run'}",
        f"encoder_pretraining={json.dumps({'data': {'root': str(pre_root)}, **SETTINGS})}",
        "encoder_pretraining.modalities=[image]", *extra])


def _samples(root: Path, modality: str) -> list:
    plugin = MODALITIES.get(modality)()
    return list(load_manifest(root / modality / "train.json", root, {modality: plugin}).samples)


def test_task_heads_loss_uses_each_samples_own_task():
    heads = TaskHeads(4, {"a": ["x", "y"], "b": ["p", "q", "r"]})
    feats = torch.randn(3, 2, 2)
    task, label = torch.tensor([0, 1, 1]), torch.tensor([1, 2, 0])
    flat = feats.flatten(1)
    want = (torch.nn.functional.cross_entropy(heads.heads[0](flat[:1]), label[:1], reduction="sum")
            + torch.nn.functional.cross_entropy(heads.heads[1](flat[1:]), label[1:],
                                                reduction="sum")) / 3
    assert torch.allclose(heads.loss(feats, task, label), want)


def test_labelled_inputs_classes_are_each_tasks_distinct_answers(pre_root):
    plugin = MODALITIES.get("image")()
    samples = _samples(pre_root, "image")
    inputs, task, label, classes = labelled_inputs(plugin, samples)
    assert set(classes) == {"caption", "color", "shape"}
    assert classes["color"] == ["blue", "green", "red"]
    assert len(inputs) == len(samples) == len(task) == len(label)
    assert inputs[0].shape == (3, 32, 32)


def test_pretraining_learns_and_changes_only_the_copy(pre_root):
    plugin = MODALITIES.get("image")()
    samples = _samples(pre_root, "image")
    before = {k: v.clone() for k, v in plugin.build_encoder().state_dict().items()}
    state, info = pretrain_encoder(plugin, samples, {**SETTINGS, "steps": 60})
    assert set(state) == set(before)
    assert any(not torch.equal(state[k], before[k]) for k in state)
    # colour is read from raw pixels at once: the trained tower + head must be far above chance
    assert info["train_accuracy"]["color"] >= 80.0, info
    assert info["classes"]["color"] == 3 and info["classes"]["shape"] == 3
    # the plugin's own build is untouched (a fresh build equals the seeded random init)
    fresh = plugin.build_encoder().state_dict()
    assert all(torch.equal(fresh[k], before[k]) for k in before)


def test_weights_are_trained_once_and_keyed_on_what_changes_them(pre_root, tmp_path):
    recipe = _recipe(pre_root, tmp_path)
    path = pretrained_weights(recipe, "image", log=lambda *_: None)
    assert path.is_file() and path.with_suffix(".json").is_file()
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["settings"]["steps"] == 8 and side["modality"] == "image"
    stamp = path.stat().st_mtime_ns
    again = pretrained_weights(_recipe(pre_root, tmp_path), "image", log=lambda *_: None)
    assert again == path and path.stat().st_mtime_ns == stamp  # found, not retrained
    other = pretrained_weights(_recipe(pre_root, tmp_path, "encoder_pretraining.seed=1"),
                               "image", log=lambda *_: None)
    assert other != path
    opts = pretrained_weights(_recipe(pre_root, tmp_path, "modalities.image.layers=1"),
                              "image", log=lambda *_: None)
    assert opts not in (path, other)


def test_apply_points_the_recipe_at_the_weights_and_the_model_loads_them(pre_root, tmp_path):
    recipe = apply_encoder_pretraining(_recipe(pre_root, tmp_path), log=lambda *_: None)
    path = Path(recipe["modalities"]["image"][ENCODER_WEIGHTS])
    assert path.is_file()
    assert ENCODER_WEIGHTS not in recipe["modalities"]["video"]  # only the modalities asked for
    plugin = MODALITIES.get("image")(**recipe["modalities"]["image"])
    from safetensors.torch import load_file
    saved = load_file(str(path))
    loaded = plugin.make_encoder().state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    # the feature cache key follows the weights (fingerprint of the options names the file)
    assert plugin.fingerprint() != MODALITIES.get("image")().fingerprint()


def test_recipe_that_names_its_weights_is_left_alone(pre_root, tmp_path, monkeypatch):
    import mil_plugins.engine.encoder_pretraining as ep

    def fail(*a, **k):
        raise AssertionError("trained an encoder the recipe already has weights for")
    monkeypatch.setattr(ep, "pretrain_encoder", fail)
    mine = tmp_path / "mine.safetensors"
    recipe = _recipe(pre_root, tmp_path, "encoder_pretraining.seed=7",
                     f"modalities.image.encoder_weights={mine}")
    out = apply_encoder_pretraining(recipe, log=lambda *_: None)
    assert out["modalities"]["image"][ENCODER_WEIGHTS] == str(mine)


def test_steps_by_modality_and_workers_give_the_same_weights(pre_root, tmp_path):
    from safetensors.torch import load_file

    base = ["encoder_pretraining.modalities=[image, audio]", "encoder_pretraining.steps=4",
            "encoder_pretraining.steps_by_modality={audio: 3}"]
    serial = apply_encoder_pretraining(_recipe(pre_root, tmp_path, *base,
                                               f"encoder_pretraining.dir={tmp_path / 'w1'}"),
                                       log=lambda *_: None)
    parallel = apply_encoder_pretraining(_recipe(pre_root, tmp_path, *base,
                                                 "encoder_pretraining.workers=2",
                                                 f"encoder_pretraining.dir={tmp_path / 'w2'}"),
                                         log=lambda *_: None)
    for m in ("image", "audio"):
        a = Path(serial["modalities"][m][ENCODER_WEIGHTS])
        b = Path(parallel["modalities"][m][ENCODER_WEIGHTS])
        assert a.name == b.name and a.parent != b.parent
        sa, sb = load_file(str(a)), load_file(str(b))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    side = json.loads(Path(serial["modalities"]["audio"][ENCODER_WEIGHTS]).with_suffix(".json")
                      .read_text())
    assert side["settings"]["steps"] == 3


def test_bad_weights_name_the_file(tmp_path):
    from safetensors.torch import save_file
    bad = tmp_path / "bad.safetensors"
    save_file({"nope": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match=r"bad.safetensors do not fit"):
        MODALITIES.get("image")(encoder_weights=str(bad)).make_encoder()
    with pytest.raises(ValueError, match=r"missing.safetensors not found"):
        MODALITIES.get("image")(encoder_weights=str(tmp_path / "missing.safetensors")).make_encoder()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"cannot read encoder_weights .*junk.safetensors"):
        MODALITIES.get("image")(encoder_weights=str(junk)).make_encoder()


def test_recipe_ranges_are_checked(pre_root, tmp_path):
    with pytest.raises(RecipeError, match="encoder_pretraining.steps"):
        _recipe(pre_root, tmp_path, "encoder_pretraining.steps=0")
    with pytest.raises(RecipeError, match="encoder_pretraining"):
        _recipe(pre_root, tmp_path, "encoder_pretraining.stepz=3")

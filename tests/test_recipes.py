"""Every shipped recipe validates; bad recipes fail with the file and the key path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mil_plugins.engine.distributed import fill_deepspeed_config
from mil_plugins.recipe import RecipeError, apply_overrides, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run:"), f"{path} must start with the command that runs it"
    runner = "mil federate" if recipe.get("federated") else "tools/train.py"
    assert runner in first and path.name in first
    if recipe["train"]["deepspeed"]:
        assert (ROOT / recipe["train"]["deepspeed"]).exists()


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """
model: {llm: {config: {model_type: llama}}, tokenizer: {build_from_data: true}}
modalities: {image: {}}
data: {root: data}
stages: [{name: image, modality: image, train: image/train.json, test: image/test.json}]
output: {dir: out}
"""


def test_defaults_are_filled(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe["train"]["batch_size"] == 16
    assert recipe["methods"] == [{"name": "finetune", "options": {}}]
    assert recipe["model"]["connector"]["mode"] == "shared"
    assert recipe["eval"]["choices"] is None
    assert load_recipe(write(tmp_path, with_section("eval: {choices: task}")))["eval"]["choices"] == "task"


def with_section(line: str) -> str:
    """BASE with one top-level section replaced (a key given twice is an error)."""
    key = line.split(":", 1)[0]
    kept = [x for x in BASE.splitlines() if not x.startswith(key + ":")]
    return "\n".join(kept + [line]) + "\n"


@pytest.mark.parametrize("extra, key, message", [
    ("train: {lrr: 1}", "train.lrr", "did you mean 'lr'"),
    ("train: {batch_size: many}", "train.batch_size", "expected int"),
    ("train: {scheduler: wavy}", "train.scheduler", "not one of"),
    ("eval: {choices: each}", "eval.choices", "'each' is not one of task, sample"),
    ("methods: [{name: ewk}]", "methods.0.name", "did you mean 'ewc'"),
    ("model: {llm: {config: {}}, tokenizer: {build_from_data: true}, connector: {projector_type: mlp2x_relu}}",
     "model.connector.projector_type", "unknown projector"),
    ("modalities: {imag: {}}", "modalities.imag", "did you mean 'image'"),
    ("modalities: {image: {colour: 1}}", "modalities.image", "unknown option"),
    ("stages: [{name: a, modality: audio, train: x.json}]", "stages.0.modality", "no entry in the modalities"),
    ("stages: [{name: a, modality: image}]", "stages.0.train", "missing required key"),
    ("train: {trainable: [conector]}", "train.trainable.0", "did you mean 'connector'"),
])
def test_bad_recipes_name_file_and_key(tmp_path, extra, key, message):
    path = write(tmp_path, with_section(extra))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.key == key
    assert str(path) in str(err.value) and message in str(err.value)


def test_extends_and_overrides(tmp_path):
    write(tmp_path, BASE + "train: {lr: 0.001, epochs: 2}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\ntrain: {epochs: 3}\n", "child.yaml")
    recipe = load_recipe(child, ["train.lr=1e-4", "stages.0.epochs=5", "output.dir=elsewhere"])
    assert recipe["train"]["lr"] == pytest.approx(1e-4) and recipe["train"]["epochs"] == 3
    assert recipe["stages"][0]["epochs"] == 5 and recipe["output"]["dir"] == "elsewhere"
    with pytest.raises(RecipeError, match="not an index"):
        load_recipe(child, ["stages.3.epochs=1"])


def test_replace_marker_swaps_a_mapping_instead_of_merging(tmp_path):
    write(tmp_path, BASE + "encoder_pretraining: {data: {root: pre}, steps: 9, "
                           "steps_by_modality: {image: 4, depth: 3}}\n", "base.yaml")
    merged = write(tmp_path, "extends: base.yaml\n"
                             "encoder_pretraining: {steps_by_modality: {image: 1}}\n", "merged.yaml")
    replaced = write(tmp_path, "extends: base.yaml\nencoder_pretraining: "
                               "{steps_by_modality: {_replace_: true, image: 1}}\n", "replaced.yaml")
    assert load_recipe(merged)["encoder_pretraining"]["steps_by_modality"] == {"image": 1, "depth": 3}
    pretraining = load_recipe(replaced)["encoder_pretraining"]
    assert pretraining["steps_by_modality"] == {"image": 1}  # depth gone, no marker left
    assert pretraining["steps"] == 9 and pretraining["data"]["root"] == "pre"  # the rest merged
    # a marker in a recipe that extends nothing, or under a key the parent lacks, is just dropped
    root = write(tmp_path, BASE + "train: {_replace_: true, epochs: 2}\n", "root.yaml")
    assert load_recipe(root)["train"]["epochs"] == 2
    fresh = write(tmp_path, "extends: base.yaml\nwarmup: {_replace_: false, train: t.json}\n",
                  "fresh.yaml")
    assert "_replace_" not in load_recipe(fresh)["warmup"]


def test_circular_extends(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(RecipeError, match="circular"):
        load_recipe(tmp_path / "a.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, with_section("output: !!python/object/apply:os.system ['echo pwned']"))
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(path)


def test_override_parsing():
    data = apply_overrides({"a": {"b": [1, 2]}}, ["a.b.1=3", "a.c=[x, y]", "d.e=true"])
    assert data == {"a": {"b": [1, 3], "c": ["x", "y"]}, "d": {"e": True}}


@pytest.mark.parametrize("name", ["zero0.json", "zero2.json", "zero2_offload.json", "zero3.json",
                                  "zero3_offload.json"])
def test_deepspeed_configs_are_filled_from_the_recipe(name):
    train = {"batch_size": 16, "grad_accum": 2, "max_grad_norm": 0.5, "precision": "bf16"}
    config = fill_deepspeed_config(ROOT / "recipes" / "deepspeed" / name, train, world_size=4)
    raw = json.loads((ROOT / "recipes" / "deepspeed" / name).read_text())
    assert raw["train_batch_size"] == "auto"
    assert config["train_batch_size"] == 16 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(config)
    with pytest.raises(ValueError, match="multiple"):
        fill_deepspeed_config(ROOT / "recipes" / "deepspeed" / name, {**train, "batch_size": 6}, 4)


def test_recipe_reference_lists_every_schema_key():
    from mil_plugins.recipe import schema as S

    text = (ROOT / "docs" / "recipes.md").read_text()
    for section in (S.RECIPE, S.MODEL, S.LLM, S.TOKENIZER, S.CONNECTOR, S.LORA, S.DATA, S.GENERATE,
                    S.WARMUP, S.ENCODER_PRETRAINING, S.STAGE, S.METHOD, S.TRAIN, S.EVAL,
                    S.OUTPUT, S.FEDERATED):
        for key in section:
            assert f"| `{key}` |" in text, f"docs/recipes.md does not list {key!r}"

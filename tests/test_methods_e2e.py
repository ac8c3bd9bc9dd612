"""End to end: every registered method runs a 2-stage cut of recipes/quickstart.yaml (a few steps)
and reports a 2x2 accuracy matrix; the stateful built-ins resume from the stage-1 checkpoint to
bit-identical stage-2 weights (their state_dict / load_state_dict carry everything)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mil_plugins.plugins import METHODS

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not RECIPE.exists(), reason="recipes/quickstart.yaml is missing")]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("mcl-tiny")  # generated once by the first run (data.generate)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("MIL_NUM_THREADS", "1")  # main() applies it process-wide: restore after
    yield
    torch.set_num_threads(threads)


def _args(data_root: Path, out: Path, method: str) -> list[str]:
    recipe = yaml.safe_load(RECIPE.read_text())
    stages = recipe["stages"][:2]
    modalities = {s["modality"]: recipe["modalities"].get(s["modality"]) or {}
                  for s in stages if s.get("modality")}
    return [str(RECIPE), f"data.root={data_root}", f"output.dir={out}",
            "output.tensorboard=false",
            f"modalities={json.dumps(modalities)}", f"stages={json.dumps(stages)}",
            "warmup.max_steps=2", "train.max_steps=2", "data.max_train_samples=16",
            "data.max_test_samples=6", "eval.batch_size=8", "eval.unseen=false",
            f"methods={json.dumps([{'name': method}])}"]


def _run(args: list[str]) -> dict:
    from mil_plugins.engine.run import main

    assert main(args) == 0
    out = Path(next(a for a in args if a.startswith("output.dir=")).split("=", 1)[1])
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_runs_two_stages(method, data_root, tmp_path):
    metrics = _run(_args(data_root, tmp_path / "out", method))
    matrix = metrics["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert matrix[0][0] is not None and matrix[1][0] is not None and matrix[1][1] is not None
    assert metrics["method"] == method


@pytest.mark.parametrize("method", ["replay", "ewc", "lwf", "expansion"])
def test_resume_from_stage_one_is_bit_identical(method, data_root, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    args = _args(data_root, out, method)
    first = _run(args)
    ckpts = out / "checkpoints"
    stage2 = next(p for p in ckpts.iterdir() if p.name.startswith("stage-02-"))
    before = load_file(str(stage2 / "weights.safetensors"))
    methods_before = (stage2 / "methods.json").read_text()
    stage1 = next(p for p in ckpts.iterdir() if p.name.startswith("stage-01-"))
    shutil.rmtree(ckpts / "last")
    shutil.copytree(stage1, ckpts / "last")
    second = _run(args + ["--resume"])
    after = load_file(str(stage2 / "weights.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].equal(after[key]), key
    assert (stage2 / "methods.json").read_text() == methods_before
    assert second["accuracy_matrix"] == first["accuracy_matrix"]

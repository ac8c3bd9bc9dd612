"""HF-style settings in a real (tiny) run: DataLoader workers give the same batches, gradient
checkpointing the same losses, and report_to gets the evaluation scores of every stage."""

from __future__ import annotations

import json
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType, SimpleNamespace

import pytest
import torch

from _tiny_run import tiny_args

pytestmark = pytest.mark.slow


class FakeWandb(ModuleType):
    """Stands in for the wandb package: records what a run sends (no network, no account)."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = ModuleSpec("wandb", loader=None)
        self.__version__ = "0.0-fake"
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return SimpleNamespace(log=self.logged.append, finish=self._finish)

    def _finish(self):
        self.finished += 1


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from mil_plugins.benchmark import make_benchmark

    root = tmp_path_factory.mktemp("bench") / "mcl-tiny"
    make_benchmark(root, size="tiny", seed=0, modalities=["image", "video"])
    return root


def run(bench, out, *extra):
    from mil_plugins.cli.train import main

    threads = torch.get_num_threads()
    try:
        assert main(tiny_args(bench, out, "train.log_every_steps=1", "train.max_steps=3",
                              "warmup=null", *extra)) == 0
    finally:
        torch.set_num_threads(threads)
    return [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]


def losses(records):
    return [(r["stage"], r["step"], r["loss"]) for r in records if "loss" in r]


def test_workers_checkpointing_and_report_to(bench, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    plain = run(bench, tmp_path / "plain")
    hf = run(bench, tmp_path / "hf", "train.dataloader_num_workers=2", "train.gradient_checkpointing=true",
             "train.report_to=[tensorboard, wandb]")

    # the same batches in the same order (workers), the same maths (checkpointing)
    a, b = losses(plain), losses(hf)
    assert len(a) == 6 and [x[:2] for x in a] == [x[:2] for x in b]
    assert [x[2] for x in a] == pytest.approx([x[2] for x in b], rel=1e-5)

    # W&B: one run named after the folder, the recipe as config, loss/lr and eval scores per stage
    assert len(fake.inits) == 1 and fake.inits[0]["name"] == "hf" and fake.finished == 1
    assert fake.inits[0]["config"]["train"]["dataloader_num_workers"] == 2
    keys = set().union(*fake.logged)
    assert {"image/loss", "image/lr", "video/loss", "eval/image", "eval/video"} <= keys
    evals = [d for d in fake.logged if "eval/image" in d]
    assert len(evals) == 2 and "eval/video" in evals[1]               # after stage 1 and stage 2

    # TensorBoard: the same scalars, eval/<stage> over the stages trained
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "hf" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"image/loss", "eval/image", "eval/video"} <= tags
    assert [e.step for e in acc.Scalars("eval/image")] == [1, 2]
    metrics = json.loads((tmp_path / "hf" / "metrics.json").read_text())
    assert [e.value for e in acc.Scalars("eval/image")] == pytest.approx(
        [row[0] for row in metrics["accuracy_matrix"]], abs=1e-4)

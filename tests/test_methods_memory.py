"""Memory a stage holds, per method, on a model large enough to see a copy of it.

The measure is behaviour, not timing: the bytes of every live tensor storage (found through the
garbage collector, each storage counted once), sampled after every optimiser step of a stage,
minus what was live when the stage began and minus what training needs (a gradient and two AdamW
moments per trainable parameter). A full copy of the model (what the engine used to take
at every stage start, for every method) shows up as at least the model's size; the methods here
train a small LoRA and the connector, so none of them may hold anything near that
(``finetune`` keeps no teacher at all; ``lwf``'s teacher shares the frozen weights)."""

from __future__ import annotations

import gc

import pytest
import torch

from mil_plugins.plugins import METHODS

pytestmark = pytest.mark.slow

BIG = ["model.llm.config.hidden_size=256", "model.llm.config.intermediate_size=1024",
       "model.llm.config.num_hidden_layers=4", "model.llm.config.num_attention_heads=4",
       "model.llm.config.num_key_value_heads=4",
       'model.lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}',
       "train.feature_cache=false"]  # cached features are data, not model state


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("mcl-tiny-mem")  # generated once by the first run


def live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:  # a dead weakref.proxy left by an earlier test raises on any attribute access
            if not (isinstance(obj, torch.Tensor) and obj.device.type == "cpu"):
                continue
            storage = obj.untyped_storage()
        except (RuntimeError, ReferenceError):
            continue
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def test_the_measure_sees_a_full_copy():
    from mil_plugins.methods.context import lazy_frozen_copy

    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    before = live_tensor_bytes()
    copy = lazy_frozen_copy(model)  # the old engine's snapshot at every stage start
    assert live_tensor_bytes() - before >= 0.95 * size
    del copy


@pytest.mark.parametrize("method", METHODS.names())
def test_a_stage_holds_no_copy_of_the_model(method, data_root, tmp_path, monkeypatch):
    from test_methods_e2e import _args, _run

    from mil_plugins.engine.session import Session
    from mil_plugins.methods.dispatch import MethodHooks

    monkeypatch.setenv("MIL_NUM_THREADS", "1")
    start: dict = {}
    peak: dict = {}
    trained: dict = {}  # bytes of the stage's trainable parameters
    sizes: list = []
    fit = Session.fit_standardizer
    after_step = MethodHooks.after_step

    def fit_and_mark(self, stage):
        if not sizes:
            sizes.append(sum(p.numel() * p.element_size() for p in self.model.parameters()))
        start[stage.name] = live_tensor_bytes()
        return fit(self, stage)

    def step_and_sample(self, stage, step):
        after_step(self, stage, step)
        if stage is not None and stage.name in start:
            peak[stage.name] = max(peak.get(stage.name, 0), live_tensor_bytes())
            trained[stage.name] = sum(p.numel() * p.element_size()
                                      for p in self.ctx.model.parameters() if p.requires_grad)

    monkeypatch.setattr(Session, "fit_standardizer", fit_and_mark)
    monkeypatch.setattr(MethodHooks, "after_step", step_and_sample)
    threads = torch.get_num_threads()
    try:
        _run(_args(data_root, tmp_path / "out", method) + BIG + ["train.max_steps=2"])
    finally:
        torch.set_num_threads(threads)
    model_bytes = sizes[0]
    assert model_bytes > 10e6  # large enough that a copy stands out
    assert len(peak) == 2, peak
    # what a stage needs: a gradient and two AdamW moments per trainable parameter; beyond that
    # (a teacher, importance state, activations) it must hold well under a copy of the model
    beyond = {name: peak[name] - start[name] - 3 * trained[name] for name in peak}
    print(f"[memory] {method}: model {model_bytes} B, held beyond training needs {beyond}")
    assert all(b < 0.25 * model_bytes for b in beyond.values()), (method, beyond, model_bytes)

"""``tme``: similarity decides whether a stage adds, initialises or reuses a branch; inputs are
routed to the branch of the nearest stage from their own descriptor, never from a task label,
sample id or the current stage; decisions and descriptors survive a checkpoint round trip."""

from __future__ import annotations

import inspect

import pytest
import torch

import test_methods_unit as U
from _model_fixtures import registered_fakes
from mil_plugins.methods import descriptors as D
from mil_plugins.methods.tme import TME, decide

VEC, SEQ = U.VEC, U.SEQ
LORA = U.LORA


@pytest.fixture(autouse=True, scope="module")
def _fakes():
    with registered_fakes():
        yield


def test_decide_rule():
    assert decide({}, 0.9, 0.5) == ("add", None, 0.0)
    assert decide({"stage0": 0.95, "stage1": 0.2}, 0.9, 0.5) == ("reuse", "stage0", 0.95)
    assert decide({"stage0": 0.6, "stage1": 0.7}, 0.9, 0.5) == ("init", "stage1", 0.7)
    assert decide({"stage0": 0.1}, 0.9, 0.5) == ("add", "stage0", 0.1)


def _adapter(h, key):
    return h.model.connector.expansion.adapters[key]


def test_add_init_and_reuse_follow_the_thresholds():
    # add (default thresholds: VEC and SEQ stages are about 0.5 alike, below init 0.5 + margin)
    h = U.Harness([TME(init_threshold=0.95, reuse_threshold=0.99)])
    t = h.methods[0]
    s0, s1 = h.stages
    h.run_stage(s0, steps=2, lr=5e-2)
    _, names = h.begin(s1)
    assert t.decisions["stage1"]["action"] == "add" and t.assign["stage1"] == "stage1"
    assert torch.equal(_adapter(h, "stage1").up.weight, torch.zeros_like(_adapter(h, "stage1").up.weight))
    assert any(".adapters.stage1." in n for n in names)
    assert not any(".adapters.stage0." in n for n in names)
    s = t.decisions["stage1"]["similarity"]
    assert s == pytest.approx(D.similarity(t.stage_descriptors["stage1"], t.stage_descriptors["stage0"],
                                           t.part_weights))

    # initialise: the new branch starts as a copy of the most similar stage's
    h = U.Harness([TME(init_threshold=-1.0, reuse_threshold=1.01)])
    t = h.methods[0]
    h.run_stage(h.stages[0], steps=2, lr=5e-2)
    assert _adapter(h, "stage0").up.weight.abs().sum() > 0
    _, names = h.begin(h.stages[1])
    assert t.decisions["stage1"] == {"action": "init", "source": "stage0", "branch": "stage1",
                                     "similarity": pytest.approx(s)}
    assert torch.equal(_adapter(h, "stage1").up.weight, _adapter(h, "stage0").up.weight)
    assert any(".adapters.stage1." in n for n in names)

    # reuse: the stage trains the earlier branch, no new one
    h = U.Harness([TME(init_threshold=-1.0, reuse_threshold=-1.0)])
    t = h.methods[0]
    h.run_stage(h.stages[0], steps=2, lr=5e-2)
    _, names = h.begin(h.stages[1])
    assert t.decisions["stage1"]["action"] == "reuse" and t.assign["stage1"] == "stage0"
    assert any(".adapters.stage0." in n for n in names)
    assert not any(".adapters.stage1." in n for n in names)
    assert h.model.connector.expansion.forced == {SEQ: "stage0"}
    before = _adapter(h, "stage0").up.weight.detach().clone()
    h.train(h.stages[1], steps=2, lr=5e-2)
    h.end(h.stages[1])
    assert not torch.equal(before, _adapter(h, "stage0").up.weight)
    assert t.routes == {VEC: ["stage0"], SEQ: ["stage0"]}


def _trained(**options):
    h = U.Harness([TME(init_threshold=0.95, reuse_threshold=0.99, **options)])
    for st in h.stages:
        h.run_stage(st, steps=3, lr=5e-2)
    return h, h.methods[0]


def test_routing_reads_the_input_never_the_task_label():
    h, t = _trained()
    s0, s1 = h.stages
    mixed = [s0.test_samples[0], s1.test_samples[0], s0.test_samples[1], s1.test_samples[1]]
    batch = h.collate(mixed, train=False)
    t.before_forward(h.ctx, batch)
    assert t.last_choice == ["stage0", "stage1", "stage0", "stage1"]  # nearest stage, per item
    with torch.no_grad():
        ref = h.model(batch).logits
        assert h.model.connector.expansion.choice == ["stage1", "stage1"]  # the SEQ items
        # task labels, ids, answers removed or poisoned, another current stage: same route
        h.ctx.stage = s0
        for poisoned in ({k: v for k, v in batch.items() if k not in ("tasks", "ids", "answers")},
                         dict(batch, tasks=["image-caption"] * 4, ids=list("wxyz"),
                              answers=["cat"] * 4)):
            t.before_forward(h.ctx, poisoned)
            assert t.last_choice == ["stage0", "stage1", "stage0", "stage1"]
            assert torch.equal(h.model(poisoned).logits, ref)
    # the item descriptor's signature takes the model and the batch, nothing about tasks
    assert list(inspect.signature(D.item_descriptors).parameters) == ["model", "batch", "dim",
                                                                     "with_answer"]


def test_a_routed_stage_keeps_its_predictions():
    h = U.Harness([TME(init_threshold=0.95, reuse_threshold=0.99)])
    s0, s1 = h.stages
    h.run_stage(s0, steps=3, lr=5e-2)
    loss0 = h.loss(s0)
    h.run_stage(s1, steps=3, lr=5e-2)
    assert h.loss(s0) == pytest.approx(loss0, rel=1e-6)  # its own branch, base frozen


def test_lora_target_routes_whole_batches_by_majority():
    h = U.Harness([TME(init_threshold=0.95, reuse_threshold=0.99)], lora=LORA, trainable=("lora",))
    t = h.methods[0]
    assert t.targets == ["lora"]
    for st in h.stages:
        h.run_stage(st, steps=2, lr=5e-2)
    s0, s1 = h.stages
    batch = h.collate([s0.test_samples[0], s0.test_samples[1], s1.test_samples[0]], train=False)
    t.before_forward(h.ctx, batch)
    assert t.last_choice == ["stage0", "stage0", "stage1"]
    assert t._active == ["default", "stage0"]


def test_state_round_trip_restores_decisions_without_recomputing(tmp_path, monkeypatch):
    h, t = _trained()
    state = U.checkpoint_roundtrip({"tme": t.state_dict()}, tmp_path)
    weights = h.saved_weights()
    h2 = U.Harness([TME(init_threshold=0.95, reuse_threshold=0.99)])
    U.restore(h2, state, weights)
    t2 = h2.methods[0]
    assert t2.assign == t.assign and t2.decisions == t.decisions
    monkeypatch.setattr(D, "stage_descriptor", lambda *a, **k: pytest.fail("recomputed"))
    t2.before_stage(h2.ctx, h2.stages[1])  # a resumed stage keeps its decision
    t2.after_stage(h2.ctx, h2.stages[1])
    h2.ctx.seen = h2.stages
    s0, s1 = h.stages
    batch = h.collate([s0.test_samples[0], s1.test_samples[0]], train=False)
    t.before_forward(h.ctx, batch)
    t2.before_forward(h2.ctx, h2.collate([s0.test_samples[0], s1.test_samples[0]], train=False))
    assert t.last_choice == t2.last_choice
    assert h.loss(s0) == pytest.approx(h2.loss(s0), rel=1e-6)


def test_options_validated():
    with pytest.raises(ValueError, match="tme"):
        TME(init_threshold=0.9, reuse_threshold=0.5)
    with pytest.raises(ValueError, match="tme"):
        TME(descriptor_weights={"pixels": 1.0})

"""``tir`` and the task descriptors it shares with ``tme``: descriptors come from the data and the
input only, similarities set the per-stage weights of the importance penalty, the weights are used
(change a descriptor, the penalty changes), and everything survives a checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

import test_methods_unit as U
from _model_fixtures import registered_fakes
from mil_plugins.methods import descriptors as D
from mil_plugins.methods.tir import TIR, similarity_weight

VEC, SEQ = U.VEC, U.SEQ


@pytest.fixture(autouse=True, scope="module")
def _fakes():
    with registered_fakes():
        yield


def _two_stages(**options):
    h = U.Harness([TIR(**options)])
    s0, s1 = h.stages
    h.run_stage(s0, steps=2, lr=2e-2)
    h.begin(s1)
    h.train(s1, steps=2, lr=2e-2)  # weights move away from the stage-0 anchor
    return h, h.methods[0], s0, s1


def _hand_penalty(h, t, weight_of):
    params = dict(h.model.named_parameters())
    total = 0.0
    for pen in t.penalties:
        for k, f in pen["fisher"].items():
            p = params[k]
            if p.requires_grad:
                total += weight_of(pen["stage"]) * float((f * (p.detach() - pen["anchor"][k]) ** 2).sum())
    return 0.5 * float(t.options["lambda"]) * total


def test_similarity_weight_directions_and_floor():
    assert similarity_weight(0.9, "dissimilar", 0.0) == pytest.approx(0.1)
    assert similarity_weight(-0.5, "dissimilar", 0.0) == 1.0
    assert similarity_weight(0.9, "similar", 0.0) == pytest.approx(0.9)
    assert similarity_weight(-0.5, "similar", 0.2) == pytest.approx(0.2)
    assert similarity_weight(0.3, "none", 0.0) == 1.0


def test_descriptors_come_from_the_input_and_modalities_do_not_alias():
    h = U.Harness([])
    s0, s1 = h.stages
    batch = h.collate(s0.train_samples[:4] + s1.train_samples[:4], train=True)
    items = D.item_descriptors(h.model, batch, 64)
    assert all(d["features"] is not None and d["instruction"] is not None and d["answer"] is not None
               for d in items)
    poisoned = dict(batch, tasks=["x"] * 8, ids=list("abcdefgh"), answers=["z"] * 8)
    for a, b in zip(items, D.item_descriptors(h.model, poisoned, 64)):
        for part in D.PARTS:
            assert torch.equal(a[part], b[part])
    # the same modality's items are alike, the two modalities' feature parts about orthogonal
    vec = D.mean_descriptor(items[:4])
    seq = D.mean_descriptor(items[4:])
    only_features = {"features": 1.0, "instruction": 0.0, "answer": 0.0}
    assert D.similarity(vec, vec, D.DEFAULT_WEIGHTS) == pytest.approx(1.0)
    assert abs(D.similarity(vec, seq, only_features)) < 0.35
    # without labels (a prompt at inference) there is no answer part
    prompt = D.item_descriptors(h.model, h.collate(s0.test_samples, train=False), 64)
    assert all(d["answer"] is None and d["features"] is not None for d in prompt)


@pytest.mark.parametrize("importance", ["fisher", "mas"])
def test_penalty_is_similarity_weighted_importance(importance):
    h, t, s0, s1 = _two_stages(importance=importance)
    assert set(t.descriptors) == {"s0", "s1"}
    s = D.similarity(t.descriptors["s1"], t.descriptors["s0"], t.part_weights)
    assert t.similarities["s0"] == pytest.approx(s)
    assert t.weights["s0"] == pytest.approx(similarity_weight(s, "dissimilar", 0.0))
    assert 0.0 < t.weights["s0"] < 1.0
    assert all(bool((f >= 0).all()) for f in t.penalties[0]["fisher"].values())
    term = float(t.loss_terms(h.ctx, {}, None)["penalty"])
    assert term > 0
    assert term == pytest.approx(_hand_penalty(h, t, lambda st: t.weights[st]), rel=1e-4)


def test_changing_the_descriptors_changes_the_penalty():
    h, t, s0, s1 = _two_stages()
    before = float(t.loss_terms(h.ctx, {}, None)["penalty"])
    # stage 0 made to look exactly like stage 1: similarity 1, weight 0 (dissimilar), no penalty
    t.descriptors["s0"] = dict(t.descriptors["s1"])
    t._reweigh(s1)
    assert t.similarities["s0"] == pytest.approx(1.0) and t.weights["s0"] == pytest.approx(0.0)
    assert t.loss_terms(h.ctx, {}, None) == {}
    # made opposite: similarity -1, full weight
    t.descriptors["s0"] = {p: (None if v is None else -v) for p, v in t.descriptors["s1"].items()}
    t._reweigh(s1)
    full = float(t.loss_terms(h.ctx, {}, None)["penalty"])
    assert t.weights["s0"] == pytest.approx(1.0)
    assert full > before  # before: weight 1 - s with s ~ 0.5
    assert full == pytest.approx(_hand_penalty(h, t, lambda st: 1.0), rel=1e-4)
    # the direction option flips which stages weigh more
    t.options["direction"] = "similar"
    t._reweigh(s1)
    assert t.weights["s0"] == pytest.approx(0.0)


def test_penalty_pulls_training_toward_the_anchor_less_for_a_similar_stage():
    def drift(direction):
        h, t, s0, s1 = _two_stages(direction=direction, **{"lambda": 1e4})
        params = dict(h.model.named_parameters())
        return sum(float(((params[k].detach() - a) ** 2).sum())
                   for k, a in t.penalties[0]["anchor"].items() if params[k].requires_grad)

    # none = weight 1; dissimilar gives s0 a weight below 1 (similarity ~0.5): it moves further
    assert drift("dissimilar") > drift("none")


def test_state_survives_a_checkpoint_and_resume_does_not_recompute(tmp_path, monkeypatch):
    h, t, s0, s1 = _two_stages(importance="mas")
    state = U.checkpoint_roundtrip({"tir": t.state_dict()}, tmp_path)
    fresh = TIR(importance="mas")
    fresh.load_state_dict(state["tir"])
    assert set(fresh.descriptors) == {"s0", "s1"}
    for st, d in t.descriptors.items():
        for part in D.PARTS:
            assert (d[part] is None) == (fresh.descriptors[st][part] is None)
            if d[part] is not None:
                assert torch.equal(d[part], fresh.descriptors[st][part])
    monkeypatch.setattr(D, "stage_descriptor", lambda *a, **k: pytest.fail("recomputed"))
    fresh.before_stage(h.ctx, s1)  # a resumed stage: weights from the stored descriptors
    assert fresh.weights == pytest.approx(t.weights)
    a = float(t.loss_terms(h.ctx, {}, None)["penalty"])
    b = float(fresh.loss_terms(h.ctx, {}, None)["penalty"])
    assert a == pytest.approx(b, rel=1e-6)
    with pytest.raises(ValueError, match="importance"):
        TIR(importance="fisher").load_state_dict(state["tir"])


def test_options_validated():
    assert TIR(descriptor_weights={"answer": 0.5}).part_weights == {"features": 1.0,
                                                                   "instruction": 1.0, "answer": 0.5}
    for bad in ({"importance": "l2"}, {"direction": "up"}, {"floor": 2},
                {"descriptor_weights": {"colour": 1}}, {"descriptor_weights": {"features": 0, "instruction": 0, "answer": 0}}):
        with pytest.raises(ValueError, match="tir"):
            TIR(**bad)

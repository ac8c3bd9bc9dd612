"""``pathweave``: uni-modal adapters, in-adapters, per-modality gates (mechanism tests)."""

from __future__ import annotations

import pytest
import torch

from _model_fixtures import greedy_recompute
from mil_plugins.methods.pathweave import PathWeave
from test_methods_routed_experts import _batch
from test_methods_unit import SEQ, VEC, Harness, _fakes  # noqa: F401  (module fixture)


def _logits(h, prompt):
    h.model.eval()
    with torch.no_grad():
        return h.model(_batch(h, [prompt])).logits


def _layer(h, name="connector.0"):
    return h.methods[0].layers[name]


def test_new_adapter_is_a_no_op_and_earlier_paths_stay_bit_identical():
    h = Harness([PathWeave(train_base="never")], stages=(VEC, SEQ))
    s0, s1 = h.stages
    vec0, seq0 = _logits(h, "<vec> what is it ?"), _logits(h, "<seq> say it")
    h.begin(s0)
    assert torch.equal(_logits(h, "<vec> what is it ?"), vec0)  # A_0 starts at zero
    h.train(s0, steps=3)
    h.end(s0)
    vec1 = _logits(h, "<vec> what is it ?")
    assert not torch.equal(vec1, vec0)
    assert torch.equal(_logits(h, "<seq> say it"), seq0)  # not routed yet: the base only
    h.begin(s1)
    assert torch.equal(_logits(h, "<vec> what is it ?"), vec1)
    d = _layer(h).adapters["a1"].down.in_features
    x = torch.randn(5, d)
    new = _layer(h).adapters["a1"]
    assert torch.equal(new(x), torch.zeros(5, new.up.out_features))  # the new adapter
    assert not torch.equal(_logits(h, "<seq> say it"), seq0)  # ... but the cross-modal one acts
    frozen = {n: p.detach().clone() for n, p in h.model.named_parameters() if ".a0." in n
              or n.endswith(".a0")}
    h.train(s1, steps=3)
    h.end(s1)
    assert torch.equal(_logits(h, "<vec> what is it ?"), vec1)
    for n, p in h.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_gate_sums_to_one_per_token_and_starts_uniform():
    h = Harness([PathWeave(train_base="never")], stages=(VEC, SEQ))
    layer = _layer(h)
    x = torch.randn(3, 4, layer.adapters["a0"].down.in_features)
    layer.eval()
    g = layer.gate_weights(1, x)
    assert g.shape == (3, 4, 2) and torch.allclose(g, torch.full_like(g, 0.5))
    layer.train()
    torch.nn.init.normal_(layer.gates["a1"].w_gate.weight)
    g = layer.gate_weights(1, x)
    assert torch.allclose(g.sum(-1), torch.ones(3, 4), atol=1e-6)
    assert not torch.allclose(g, torch.full_like(g, 0.5))


@pytest.mark.parametrize("mode", ["snapshot", "retrain"])
def test_snapshots_keep_an_earlier_modality_exactly_retraining_does_not(mode):
    h = Harness([PathWeave(train_base="never", in_adapters=mode)], stages=(VEC, SEQ, VEC))
    s0, s1, s2 = h.stages
    for st in (s0, s1):
        h.run_stage(st, steps=3)
    seq = _logits(h, "<seq> say it")
    _, names = h.begin(s2)
    shared_in = [n for n in names if ".in_adapters.a0." in n]
    assert bool(shared_in) == (mode == "retrain")  # retrain: the old in-adapter trains again
    h.train(s2, steps=3)
    h.end(s2)
    same = torch.equal(_logits(h, "<seq> say it"), seq)
    assert same == (mode == "snapshot")


def test_trainable_set_follows_the_stage_and_gates_get_their_own_lr():
    h = Harness([PathWeave(gate_lr_scale=10.0)], stages=(VEC, SEQ, VEC))
    s0, s1, s2 = h.stages
    _, names0 = h.begin(s0)  # train_base first_stage: the base trains, no adapter yet
    assert any(n.startswith("connector.shared.") for n in names0)
    assert not any(".pathweave." in n for n in names0)
    assert h.methods[0].param_groups(h.ctx, s0) == []
    h.end(s0)
    _, names1 = h.begin(s1)
    assert not any(n.startswith("connector.shared.") for n in names1)
    assert {n.split(".pathweave.")[1].split(".")[1] for n in names1 if ".pathweave." in n} == {"a0"}
    h.end(s1)
    _, names2 = h.begin(s2)
    own = {n.split(".pathweave.")[1] for n in names2 if ".pathweave." in n}
    assert any(o.startswith("adapters.a1.") for o in own) and any(o.startswith("gates.a1.") for o in own)
    assert any(o.startswith("in_adapters.a1-a0.") for o in own)
    assert not any(o.startswith("adapters.a0.") for o in own)
    groups = h.methods[0].param_groups(h.ctx, s2)
    assert groups[0]["lr_scale"] == 10.0 and all(".gates.a1." in n for n in groups[0]["names"])
    result = h.train(s2, steps=2)  # the dispatcher builds the optimiser groups
    assert result["steps"] == 2


def test_llm_targets_and_cached_generation_equals_recomputation():
    h = Harness([PathWeave(train_base="never", targets=["connector", "llm"])], stages=(VEC, SEQ))
    assert any(name.startswith("llm.model.layers.1.self_attn.v_proj") for name in h.methods[0].layers)
    for st in h.stages:
        h.begin(st)
        h.end(st)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in h.model.named_parameters():
            if ".pathweave." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    batch = _batch(h, ["<vec> what is it ?", "<seq> say <vec> it", "hello what is it ?"],
                   train=False)
    suppress = sorted(h.model.placeholder_ids.values())
    cached = h.model.generate_ids(batch, max_new_tokens=5, suppress_tokens=suppress)
    assert torch.equal(greedy_recompute(h.model, batch, cached.shape[1], suppress), cached)


def test_state_round_trip_and_options():
    h = Harness([PathWeave(train_base="never")], stages=(VEC, SEQ))
    h.begin(h.stages[0])
    state = h.methods[0].state_dict()
    fresh = Harness([PathWeave(train_base="never")], stages=(VEC, SEQ))
    fresh.methods[0].load_state_dict(state)
    assert fresh.methods[0].routes == {VEC: 0}
    assert _layer(fresh).routes is fresh.methods[0].routes  # the layers see the restored routes
    with pytest.raises(ValueError, match="in_adapters"):
        PathWeave(in_adapters="sometimes")
    with pytest.raises(ValueError, match="targets"):
        PathWeave(targets=["qformer"])

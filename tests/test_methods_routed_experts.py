"""``routed_experts``: per-modality experts in the LLM, a cross-modal bridge on keys/values."""

from __future__ import annotations

import pytest
import torch

from _model_fixtures import greedy_recompute, make_batch
from mil_plugins.methods.routed_experts import RoutedExperts
from test_methods_unit import SEQ, VEC, Harness, _fakes  # noqa: F401  (module fixture)

LLM_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(h, prompts, train=True):
    g = torch.Generator().manual_seed(7)
    media = {VEC: lambda: torch.randn(6, generator=g), SEQ: lambda: torch.randn(3, 5, generator=g)}
    rows = []
    for p in prompts:
        med = {m: [media[m]()] for m in (VEC, SEQ) if ("<vec>" if m == VEC else "<seq>") in p}
        rows.append((p, "cat" if train else None, med))
    return make_batch(h.model, rows, train=train)


def _scramble(h, seed=0, what=("experts", "bridges")):
    """Give every expert / bridge non-zero weights (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in h.model.named_parameters():
            if ".routed_experts." in n and any(f".{w}." in n for w in what):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_new_experts_are_no_ops_and_text_only_input_is_the_base_llm_exactly():
    h = Harness([RoutedExperts()], setup=False)
    batch = _batch(h, ["<vec> what is it ?", "<seq> say it", "hello what is it ?"])
    text = _batch(h, ["hello what is it ?", "say the answer"])
    before, before_text = h.model(batch).logits, h.model(text).logits
    h.methods[0].setup(h.ctx)
    assert torch.equal(h.model(batch).logits, before)  # zero-initialised: bit-identical
    _scramble(h)
    assert not torch.equal(h.model(batch).logits, before)
    assert torch.equal(h.model(text).logits, before_text)  # text tokens: the base weights exactly
    n = {name for name, _ in h.model.named_parameters() if ".routed_experts." in name}
    assert any(".experts.mtest_vec." in x for x in n) and any(".bridges.mtest_seq-to_text." in x
                                                               for x in n)


def test_bridge_changes_only_the_crossing_direction():
    h = Harness([RoutedExperts(targets=["k_proj", "v_proj"])])
    batch = _batch(h, ["hello <vec> what is it ?"])
    tmap = h.model.token_modality_map(batch["input_ids"])
    vec_rows, text_before = tmap[0] == 1, (tmap[0] == 0) & (torch.arange(tmap.shape[1]) < 1)
    attn = h.model.base_llm().model.layers[0].self_attn
    seen = []
    attn.register_forward_hook(lambda mod, a, out: seen.append(out[0].detach().clone()))

    def layer0():
        seen.clear()
        h.model(batch)
        return seen[-1][0]  # the outer call (re-runs in a modality view come first)

    base = layer0()
    _scramble(h, what=("bridges",))
    with torch.no_grad():  # only the text->vec bridge (vec queries see bridged text keys/values)
        for n, p in h.model.named_parameters():
            if "-to_text." in n:
                p.zero_()
    out = layer0()
    assert torch.equal(out[~vec_rows], base[~vec_rows])  # text queries: unchanged
    assert not torch.equal(out[vec_rows], base[vec_rows])
    _scramble(h, what=("bridges",))
    with torch.no_grad():  # only the vec->text bridge (text queries see bridged vec keys/values)
        for n, p in h.model.named_parameters():
            if "-from_text." in n:
                p.zero_()
    out = layer0()
    assert torch.equal(out[vec_rows], base[vec_rows])      # vec queries: their own view
    assert torch.equal(out[text_before], base[text_before])  # text before any vec token
    after = (tmap[0] == 0) & ~text_before
    assert not torch.equal(out[after], base[after])


def test_cached_generation_equals_recomputation():
    h = Harness([RoutedExperts()])
    _scramble(h)
    batch = _batch(h, ["<vec> what is it ?", "<seq> say <vec> it", "hello what is it ?"],
                   train=False)
    suppress = sorted(h.model.placeholder_ids.values())
    cached = h.model.generate_ids(batch, max_new_tokens=5, suppress_tokens=suppress)
    assert torch.equal(greedy_recompute(h.model, batch, cached.shape[1], suppress), cached)


def test_trainable_and_earlier_experts_frozen_across_stages():
    h = Harness([RoutedExperts(lr_scale=2.0)], stages=(VEC, SEQ))
    s0, s1 = h.stages
    _, names0 = h.begin(s0)
    assert any(".experts.mtest_vec." in n for n in names0)
    assert not any(".experts.mtest_seq." in n for n in names0)
    assert any(n.startswith("connector.shared.") for n in names0)  # the base trains first
    h.train(s0, steps=3)
    h.end(s0)
    vec_loss = h.loss(s0)
    frozen = {n: p.detach().clone() for n, p in h.model.named_parameters()
              if ".mtest_vec" in n or n.startswith(("connector.shared.", "llm."))}
    assert any(".experts.mtest_vec." in n and "up" in n and p.abs().sum() > 0
               for n, p in frozen.items())  # it did learn
    _, names1 = h.begin(s1)
    assert not any(n.startswith("connector.shared.") for n in names1)
    assert not any(".mtest_vec" in n for n in names1)
    h.train(s1, steps=3)
    h.end(s1)
    for n, p in h.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert h.loss(s0) == vec_loss  # the earlier modality's path is untouched
    groups = h.methods[0].param_groups(h.ctx, s1)
    assert groups[0]["lr_scale"] == 2.0 and all(".mtest_seq" in n for n in groups[0]["names"])


def test_options_are_checked():
    with pytest.raises(ValueError, match="train_base"):
        RoutedExperts(train_base="sometimes")
    with pytest.raises(ValueError, match="rank"):
        RoutedExperts(rank=0)
    h = Harness([RoutedExperts(targets=["q_proj"])], setup=False)
    with pytest.raises(ValueError, match="bridge needs k_proj"):
        h.methods[0].setup(h.ctx)


def test_with_a_lora_llm_text_still_takes_the_base_and_lora_weights_exactly():
    from test_methods_unit import LORA

    h = Harness([RoutedExperts()], lora=LORA, trainable=("connector", "lora"), setup=False)
    text = _batch(h, ["hello what is it ?"])
    before = h.model(text).logits
    h.methods[0].setup(h.ctx)
    _scramble(h)
    assert torch.equal(h.model(text).logits, before)
    s0 = h.stages[0]
    _, names = h.begin(s0)
    assert any("lora_" in n for n in names) and any(".experts.mtest_vec." in n for n in names)
    assert h.train(s0, steps=2)["steps"] == 2

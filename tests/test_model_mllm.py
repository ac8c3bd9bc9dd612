import time

import pytest
import torch

from _model_fixtures import SeqPlugin, VecPlugin, make_batch, make_tokenizer, registered_fakes, tiny_cfg
from mil_plugins.model.build import build_model, build_tiny_llm_config
from mil_plugins.model.splice import PlaceholderMismatchError

VEC, SEQ = VecPlugin.name, SeqPlugin.name


@pytest.fixture(autouse=True, scope="module")
def _fakes():
    with registered_fakes():
        yield


def _model(mode="shared", seed=0, **kw):
    torch.manual_seed(seed)
    tok = make_tokenizer()
    return build_model(tiny_cfg(tok, mode, **kw), tok)


def _samples(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [("<vec> what is it ?", "cat", {VEC: [torch.randn(6, generator=g)]}),
            ("<seq> say <vec> it", "red blue", {SEQ: [torch.randn(3, 5, generator=g)],
                                               VEC: [torch.randn(6, generator=g)]}),
            ("<seq> <seq> say", "two", {SEQ: [torch.randn(3, 5, generator=g),
                                              torch.randn(3, 5, generator=g)]}),
            ("hello what is it ?", "world", {})][:n + 2]


def test_structure_and_placeholders():
    m = _model()
    ph = m.placeholders()
    assert set(ph) == {"<vec>", "<seq>"}
    assert ph["<vec>"][1] == 2 and ph["<seq>"][1] == 3
    tok = m.tokenizer
    assert tok.convert_tokens_to_ids("<vec>") == ph["<vec>"][0] == m.placeholder_ids[VEC]
    assert m.llm.get_input_embeddings().weight.shape[0] >= len(tok)
    assert set(m.encoders) == {VEC, SEQ}
    # frozen encoders: no grad, eval mode even after .train()
    m.train()
    assert not any(p.requires_grad for p in m.encoders.parameters())
    assert not m.encoders[SEQ].training


def test_forward_loss_finite_and_label_masking():
    m = _model().eval()
    batch = make_batch(m, _samples())
    out = m(batch)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    # masking every label but one changes the loss; no labels -> no loss
    labels = batch["labels"].clone()
    first = (labels != -100).nonzero()[0]
    only = torch.full_like(labels, -100)
    only[first[0], first[1]] = labels[first[0], first[1]]
    loss_one = m({**batch, "labels": only}).loss
    assert torch.isfinite(loss_one) and not torch.isclose(loss_one, out.loss)
    # labels at placeholder positions are always ignored
    poisoned = batch["labels"].clone()
    is_ph = (batch["input_ids"] == m.placeholder_ids[VEC]) | (batch["input_ids"] == m.placeholder_ids[SEQ])
    poisoned[is_ph] = batch["input_ids"][is_ph]
    assert torch.equal(m({**batch, "labels": poisoned}).loss, out.loss)
    assert m({k: v for k, v in batch.items() if k != "labels"}).loss is None


def test_media_changes_output_and_features_kind():
    m = _model().eval()
    batch = make_batch(m, _samples())
    base = m(batch).logits
    other = {**batch, "media": {k: v + 1 for k, v in batch["media"].items()}}
    assert not torch.allclose(m(other).logits, base)
    # pre-encoded features (feature cache) give the same result
    feats = {k: m.encode(k, v) for k, v in batch["media"].items()}
    cached = {**batch, "media": feats, "media_kind": {k: "features" for k in feats}}
    torch.testing.assert_close(m(cached).logits, base)


@pytest.mark.parametrize("mode,lora", [("shared", None), ("per_modality", None),
                                       ("shared", {"r": 2, "alpha": 4, "dropout": 0.0,
                                                   "target_modules": ["q_proj", "v_proj"]})])
def test_absent_modalities_keep_trainable_params_in_graph(mode, lora):
    m = _model(mode, lora=lora, trainable_vec=True).train()
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any(n.startswith("encoders.") for n in trainable)
    assert any(n.startswith("connector.") for n in trainable)
    text_only = make_batch(m, [("hello what is it ?", "world", {})])
    only_seq = make_batch(m, [("<seq> say", "two", {SEQ: [torch.randn(3, 5)]})])
    for batch in (text_only, only_seq):
        m.zero_grad(set_to_none=True)
        m(batch).loss.backward()
        missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], missing
    # the dummy term is exactly zero: same loss as without it
    with torch.no_grad():
        assert torch.equal(m(text_only).loss, m.llm(input_ids=text_only["input_ids"],
                                                    attention_mask=text_only["attention_mask"],
                                                    labels=text_only["labels"]).loss)


def test_errors():
    m = _model()
    b = make_batch(m, _samples(1))
    with pytest.raises(PlaceholderMismatchError, match="mtest_vec"):
        m({**b, "media": {}})
    with pytest.raises(KeyError, match="nope"):
        m({**b, "media": {**b["media"], "nope": torch.zeros(1)}})
    short = make_batch(m, _samples(1))
    short["media"][VEC] = short["media"][VEC][:1]
    with pytest.raises(PlaceholderMismatchError, match="placeholder positions"):
        m(short)
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="'bogus'"):
        build_model({**tiny_cfg(tok), "bogus": 1}, tok)
    with pytest.raises(ValueError, match="connector.*'dim'"):
        build_model({**tiny_cfg(tok), "connector": {"mode": "shared", "dim": 3}}, tok)


def test_add_modality_later_stage():
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_cfg(tok, "shared", lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]})
    cfg["modalities"] = {VEC: {}}
    m = build_model(cfg, tok)
    n_before = m.llm.get_input_embeddings().weight.shape[0]
    m.add_modality(SeqPlugin())
    assert m.llm.get_input_embeddings().weight.shape[0] == n_before + 1
    assert "connector.input_layers.mtest_seq.weight" in dict(m.named_parameters())
    out = m(make_batch(m, _samples()))
    assert torch.isfinite(out.loss)


def test_generate_batched_greedy_deterministic():
    m = _model("per_modality")
    samples = [(p, None, med) for p, _, med in _samples()]
    batch = make_batch(m, samples, train=False)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left-padded
    a = m.generate(batch, max_new_tokens=6)
    b = m.generate(batch, max_new_tokens=6)
    assert a == b and len(a) == len(samples) and all(isinstance(t, str) for t in a)
    singles = [m.generate(make_batch(m, [s], train=False), max_new_tokens=6)[0] for s in samples]
    assert singles == a
    # right-padded prompts are re-aligned to the left
    ids = torch.full_like(batch["input_ids"], m.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i in range(len(samples)):
        row = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    assert not torch.equal(ids, batch["input_ids"])
    assert m.generate({**batch, "input_ids": ids, "attention_mask": mask}, max_new_tokens=6) == a
    # sampling kwargs pass through
    m.generate(batch, max_new_tokens=2, do_sample=True, top_k=5)


def test_overfit_two_fake_modalities():
    """A tiny model learns a handful of (modality input -> answer) pairs to 100% exact match."""
    torch.manual_seed(0)
    tok = make_tokenizer()
    cfg = tiny_cfg(tok, "shared", hidden=64)
    m = build_model(cfg, tok)
    g = torch.Generator().manual_seed(3)
    vec_answers = ["cat", "dog", "red", "blue"]
    seq_answers = ["one two", "three", "four five six", "green"]
    samples = [("<vec> what is it ?", a, {VEC: [torch.randn(6, generator=g)]}) for a in vec_answers]
    samples += [("<seq> say it", a, {SEQ: [torch.randn(3, 5, generator=g)]}) for a in seq_answers]
    batch = make_batch(m, samples)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    start = time.time()
    m.train()
    for step in range(300):
        loss = m(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    gen = make_batch(m, [(p, None, med) for p, _, med in samples], train=False)
    answers = m.generate(gen, max_new_tokens=6)
    assert answers == vec_answers + seq_answers, (step, loss.item(), answers)
    print("overfit steps", step, "loss", loss.item(), "secs", time.time() - start)
    assert time.time() - start < 30


@pytest.mark.parametrize("mode", ["shared", "per_modality"])
def test_option_log_likelihoods_are_the_training_loss_of_each_answer(mode):
    """Each option's score is exactly minus the summed training cross-entropy of that answer
    after that prompt, batched prompts of different lengths and options of different lengths."""
    m = _model(mode).eval()
    tok = m.tokenizer
    samples = _samples()
    options = [["cat", "dog", "red blue green"], ["red blue", "two"], ["two"], ["world", "a the"]]
    gen = make_batch(m, [(p, None, med) for p, _, med in samples], train=False)
    ids = [[tok(o, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for o in opts]
           for opts in options]
    got = m.option_log_likelihoods(gen, ids)
    assert [len(r) for r in got] == [3, 2, 1, 2]
    for (prompt, _, med), opts, row, row_ids in zip(samples, options, got, ids):
        for text, score, o in zip(opts, row, row_ids):
            loss = m(make_batch(m, [(prompt, text, med)])).loss
            assert score == pytest.approx(-loss.item() * len(o), abs=1e-4), (prompt, text)
    with pytest.raises(ValueError, match="option lists"):
        m.option_log_likelihoods(gen, ids[:2])
    with pytest.raises(ValueError, match="at least one option"):
        m.option_log_likelihoods(gen, [[], *ids[1:]])

"""``harmony``: the modulators start as the identity and act on their own modality only; stored
statistics are the moments of the data (merged across stages exactly), survive a checkpoint round
trip and give the same loss terms after it; the alignment terms are zero where teacher and student
agree and pull training toward the stage-start connector."""

from __future__ import annotations

import pytest
import torch

import test_methods_unit as U
from _model_fixtures import registered_fakes
from mil_plugins.methods.harmony import Harmony, merge_stats

VEC, SEQ = U.VEC, U.SEQ


@pytest.fixture(autouse=True, scope="module")
def _fakes():
    with registered_fakes():
        yield


def _project(h, modality, samples):
    batch = h.collate(samples, train=False)
    with torch.no_grad():
        return h.model.project(modality, batch["media"][modality], batch["media_kind"][modality])


def test_modulators_start_as_identity_and_only_touch_their_modality():
    h = U.Harness([Harmony()])
    s0, s1 = h.stages
    stack = h.model.connector.harmony
    x = _project(h, VEC, s0.test_samples)
    feats = h.model.encode(VEC, h.collate(s0.test_samples, train=False)["media"][VEC])
    assert torch.allclose(x, U._bare(h.model, VEC, feats), atol=1e-6)  # identity at first
    with torch.no_grad():
        stack.modulators[VEC].beta.weight.fill_(0.1)
    assert not torch.allclose(_project(h, VEC, s0.test_samples), x)
    y = _project(h, SEQ, s1.test_samples)
    feats = h.model.encode(SEQ, h.collate(s1.test_samples, train=False)["media"][SEQ])
    assert torch.allclose(y, U._bare(h.model, SEQ, feats), atol=1e-6)  # SEQ's is untouched
    _, names = h.begin(s0)
    mods = {n for n in names if ".harmony." in n}
    assert mods and all(f"modulators.{VEC}." in n for n in mods)


def test_merge_stats_equals_the_moments_of_the_union():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g) + 1.0

    def stats(x):
        return {"n": x.shape[0], "h_mean": x.mean(0), "h_std": x.std(0, unbiased=False)}

    merged = merge_stats(stats(a), stats(b))
    both = stats(torch.cat([a, b]))
    assert merged["n"] == 12
    assert torch.allclose(merged["h_mean"], both["h_mean"], atol=1e-6)
    assert torch.allclose(merged["h_std"], both["h_std"], atol=1e-5)


def _after_first_stage(**options):
    h = U.Harness([Harmony(**options)], lora=U.LORA, trainable=("connector", "lora"))
    s0, s1 = h.stages
    h.run_stage(s0, steps=3, lr=5e-2)
    return h, h.methods[0], s0, s1


def test_statistics_are_stored_after_a_stage_as_the_data_moments():
    h, m, s0, s1 = _after_first_stage()
    assert set(m.stats) == {VEC} and m.aggregate["n"] == len(s0.train_samples)
    st = m.stats[VEC]
    batch = h.collate(s0.train_samples, train=False)
    with torch.no_grad():
        feats = h.model.encode(VEC, batch["media"][VEC])
        z = m._shared_input(h.model, VEC, feats)
        out = _project(h, VEC, s0.train_samples)
    per_token = m.per_token
    flat = (lambda x: x) if per_token else (lambda x: x.reshape(-1, 1, x.shape[-1]))
    assert torch.allclose(st["z_mean"], flat(z).mean(0), atol=1e-5)
    assert torch.allclose(st["h_mean"], flat(out).mean(0), atol=1e-5)
    assert torch.allclose(st["h_std"], flat(out).std(0, unbiased=False), atol=1e-5)
    assert m.prototypes[VEC].norm() == pytest.approx(1.0)


def test_terms_absent_first_stage_zero_alignment_when_teacher_is_student():
    h = U.Harness([Harmony()], lora=U.LORA, trainable=("connector", "lora"))
    s0, s1 = h.stages
    h.begin(s0)
    batch = h.collate(s0.train_samples[:4])
    out = h.model(batch)
    assert h.methods[0].loss_terms(h.ctx, batch, out) == {}  # nothing to align to yet
    h.train(s0, steps=3, lr=5e-2)
    h.end(s0)
    m = h.methods[0]
    h.begin(s1)  # the teacher is the model as it is now
    batch = h.collate(s1.train_samples[:4])
    h.model.train()
    terms = m.loss_terms(h.ctx, batch, h.model(batch))
    assert set(terms) == {"compat", "feature", "logit", "proto"}
    assert float(terms["feature"]) == pytest.approx(0.0, abs=1e-10)
    assert float(terms["logit"]) == pytest.approx(0.0, abs=1e-7)
    assert float(terms["compat"]) > 0 and torch.isfinite(terms["proto"])
    assert terms["compat"].requires_grad and terms["proto"].requires_grad
    # after some training the connector has moved: the alignment terms see it
    h.train(s1, steps=3, lr=5e-2)
    moved = m.loss_terms(h.ctx, batch, h.model(batch))
    assert float(moved["feature"]) > 0 and float(moved["logit"]) > 0


def test_statistics_survive_save_and_resume_with_the_same_terms(tmp_path):
    h, m, s0, s1 = _after_first_stage()
    h.begin(s1)
    h.train(s1, steps=2, lr=5e-2)
    state = U.checkpoint_roundtrip({"harmony": m.state_dict()}, tmp_path)
    weights = h.saved_weights()
    teacher_start = h.ctx._teacher.tensors()

    h2 = U.Harness([Harmony()], lora=U.LORA, trainable=("connector", "lora"))
    U.restore(h2, state, weights)
    m2 = h2.methods[0]
    for key, value in m.stats[VEC].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(m2.stats[VEC][key])), key
    assert torch.equal(m.prototypes[VEC], m2.prototypes[VEC])
    assert m2._step == m._step > 0
    # resume mid-stage as the engine does: before_stage, then the teacher from the checkpoint
    h2.ctx.seen = h2.stages[:1]
    h2.ctx.stage = h2.stages[1]
    h2.methods[0].before_stage(h2.ctx, h2.stages[1])
    from mil_plugins.methods.teacher import TeacherSource

    h2.ctx._teacher = TeacherSource(h2.model)
    h2.ctx._teacher.seal(teacher_start, saved=teacher_start)
    h.model.train(), h2.model.train()
    b1, b2 = h.collate(s1.train_samples[:4]), h2.collate(s1.train_samples[:4])
    t1 = m.loss_terms(h.ctx, b1, h.model(b1))
    t2 = m2.loss_terms(h2.ctx, b2, h2.model(b2))
    assert set(t1) == set(t2)
    for k in t1:
        assert float(t1[k]) == pytest.approx(float(t2[k]), rel=1e-5, abs=1e-8), k


def test_alignment_keeps_the_old_modality_closer_than_plain_training():
    def old_loss(**options):
        h = U.Harness([Harmony(**options)], lora=U.LORA, trainable=("connector", "lora"))
        s0, s1 = h.stages
        h.run_stage(s0, steps=4, lr=5e-2)
        ref = _project(h, VEC, s0.test_samples)
        h.run_stage(s1, steps=6, lr=5e-2)
        return float(((_project(h, VEC, s0.test_samples) - ref) ** 2).mean())

    off = old_loss(compat=0.0, feature=0.0, logit=0.0, proto=0.0)
    on = old_loss(feature=100.0)
    assert on < off


def test_needs_a_shared_connector_and_validates_options():
    h = U.Harness([], mode="per_modality")
    with pytest.raises(ValueError, match="shared connector"):
        Harmony().setup(h.ctx)
    for bad in ({"rank": 0}, {"feature": -1}, {"T": 0}, {"stat_samples": 0}):
        with pytest.raises(ValueError, match="harmony"):
            Harmony(**bad)


def test_logit_term_splices_pseudo_features_into_the_batch_prompts():
    h = U.Harness([Harmony(pseudo_samples=2)], lora=U.LORA, trainable=("connector", "lora"))
    m = h.methods[0]
    s1 = h.stages[1]
    batch = h.collate(s1.train_samples[:4])
    ids = batch["input_ids"]
    k = int((ids[0] == h.model.placeholder_ids[SEQ]).sum())  # SEQ's tokens per sample
    width = h.model.connector.llm_hidden
    g = torch.Generator().manual_seed(0)
    cur = {VEC: torch.randn(2, k, width, generator=g), "other": torch.randn(2, k, width, generator=g)}
    emb_s, emb_t, mask, keep = m._in_context(h.model, s1, batch, [VEC, "other"], cur, cur)
    pos = ids == h.model.placeholder_ids[SEQ]
    table = h.model.llm.get_input_embeddings()
    with torch.no_grad():
        assert torch.equal(emb_s[~pos], table(ids)[~pos])
    # sample i carries pseudo-features of old[i % 2], draw (i // 2) % 2
    for i, (mod, row) in enumerate([(VEC, 0), ("other", 0), (VEC, 1), ("other", 1)]):
        assert torch.equal(emb_s[i][pos[i]], cur[mod][row])
    first = pos.long().argmax(1)
    for i in range(4):
        assert not keep[i, : first[i]].any() and keep[i, first[i]:].eq(mask[i, first[i]:].bool()).all()
    # teacher = student and the same embeddings: zero
    kd = m._logit_kd(h.model, h.model, emb_s, emb_t, mask, keep)
    assert float(kd) == pytest.approx(0.0, abs=1e-7)
    # a count that does not match the pseudo-features' tokens: no context (pseudo tokens alone)
    short = {VEC: cur[VEC][:, :1], "other": cur["other"][:, :1]}
    assert m._in_context(h.model, s1, batch, [VEC, "other"], short, short) is None

"""``moincl``'s mechanisms on a tiny model (the harness of test_methods_unit.py): pseudo targets
come from the pre-stage model and survive a resume, the distillation terms vanish when teacher and
student agree, weight fusion follows its formula after every epoch, and the options are checked."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from _model_fixtures import registered_fakes
from mil_plugins.engine.distributed import Dist
from mil_plugins.engine.loop import StagePlan, train_stage
from mil_plugins.methods import pseudo_targets as ptg
from mil_plugins.methods.base import Method
from mil_plugins.methods.moincl import MoInCL, fuse_weights
from test_methods_unit import (LORA, TRAIN_CFG, VEC, SEQ, Harness, _Logger, _media_tensor,
                               _samples, checkpoint_roundtrip)

CAPTIONS = ["a red cat", "a blue dog", "a green cat", "two red dogs"]


@pytest.fixture(autouse=True, scope="module")
def _fakes():
    with registered_fakes():
        yield


class PathHarness(Harness):
    """Media tensors keyed by the file (as the engine loads them), not by the sample id, so a
    pseudo sample sees its source sample's media."""

    def collate(self, samples, train=True):
        swapped = [dataclasses.replace(s, id=str(next(iter(s.media.values()))[0]))
                   if s.media else s for s in samples]
        batch = super().collate(swapped, train)
        batch["ids"] = [s.id for s in samples]
        return batch


def _as_captions(stage):
    """Turn a harness stage into a captioning stage (its own prompt, caption answers, cider)."""
    stage.train_samples = [
        dataclasses.replace(s, metric="cider", task="caption", conversations=[
            {"from": "human", "value": "<vec> say it"},
            {"from": "gpt", "value": CAPTIONS[i % len(CAPTIONS)]}])
        for i, s in enumerate(stage.train_samples)]


def _harness(order=("caption", "qa"), **options):
    """Two stages of the same modality, the first of task type ``order[0]``."""
    opts = {"ikd_weight": 0.0, "fusion_alpha": 1.0, "max_new_tokens": 4, **options}
    h = PathHarness([MoInCL(**opts)], stages=(VEC, VEC), lora=LORA, trainable=("connector", "lora"))
    _as_captions(h.stages[0] if order[0] == "caption" else h.stages[1])
    return h, h.methods[0]


def _generate(h, model, method, stage):
    """What ``model`` answers to the prompts the method made its targets from."""
    ids = sorted(method.targets)
    by_id = {str(s.id): s for s in stage.train_samples}
    queries = [ptg.as_sample(by_id[i], method.targets[i][0][1], "?", method.targets[i][0][0])
               for i in ids]
    return dict(zip(ids, ptg.generate(h.ctx, model, queries, 8, 4)))


def test_task_types_come_from_metrics_or_options():
    h, _ = _harness()
    s0, s1 = h.stages
    assert ptg.stage_task_types(s0) == {"caption"} and ptg.stage_task_types(s1) == {"qa"}
    assert ptg.stage_task_types(s1, {"s1": "caption"}) == {"caption"}
    with pytest.raises(ValueError, match="task type"):
        ptg.stage_task_types(s1, {"s1": "summary"})
    earlier = ptg.earlier_types(h.stages, s1)
    assert set(earlier) == {"caption"} and len(earlier["caption"]) == len(s0.train_samples)
    assert ptg.earlier_types(h.stages, s0) == {}
    # another modality in between, or the same task type again: nothing to generate
    other = Harness(stages=(VEC, SEQ))
    assert ptg.earlier_types(other.stages, other.stages[1]) == {}


def test_pseudo_captions_come_from_the_pre_stage_model_not_the_current_one():
    h, moincl = _harness()
    s0, s1 = h.stages
    h.run_stage(s0, steps=12, lr=3e-2)   # learns to caption "<vec> say it"
    pre = copy.deepcopy(h.model)
    h.begin(s1)                            # train_samples: the targets are generated now
    assert moincl.targets_stage == "s1"
    assert set(moincl.targets) == {str(s.id) for s in s1.train_samples}
    for sid, targets in moincl.targets.items():
        assert [t[:2] for t in targets] == [["caption", "<vec> say it"]]  # the earlier instruction
    expected = _generate(h, pre, moincl, s1)
    assert {k: v[0][2] for k, v in moincl.targets.items()} == expected
    assert any(v.split()[0] in {"a", "two"} for v in expected.values())  # real captions
    # the current model moves away; the targets stay what the stage-start model said
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in h.model.named_parameters():
            if p.requires_grad:
                p.add_(2.0 * torch.randn(p.shape, generator=g))
    assert _generate(h, h.model, moincl, s1) != expected
    assert _generate(h, h.ctx.teacher(), moincl, s1) == expected
    assert {k: v[0][2] for k, v in moincl.targets.items()} == expected


def test_pseudo_answers_when_captioning_follows_qa():
    h, moincl = _harness(order=("qa", "caption"))
    s0, s1 = h.stages
    s0.train_samples = [dataclasses.replace(s, conversations=[
        s.conversations[0], {"from": "gpt", "value": ["cat", "dog"][i % 2]}])
        for i, s in enumerate(s0.train_samples)]
    h.run_stage(s0, steps=18, lr=3e-2)
    pre = copy.deepcopy(h.model)
    h.begin(s1)
    assert set(moincl.targets) == {str(s.id) for s in s1.train_samples}
    answers = {k: v[0][2] for k, v in moincl.targets.items()}
    assert answers == _generate(h, pre, moincl, s1) and set(answers.values()) <= {"cat", "dog"}
    kinds_prompts = {tuple(t[:2]) for v in moincl.targets.values() for t in v}
    assert kinds_prompts == {("qa", "<vec> what is it ?")}  # the earlier stage's question


def test_no_pseudo_targets_without_a_returning_modality_or_in_the_first_stage():
    h = PathHarness([MoInCL(ikd_weight=0.0)], stages=(VEC, SEQ), lora=LORA,
                    trainable=("connector", "lora"))
    moincl = h.methods[0]
    h.begin(h.stages[0])
    batch = h.collate(h.stages[0].train_samples[:4])
    assert moincl.loss_terms(h.ctx, batch, h.model(batch)) == {}  # first stage: nothing to keep
    h.train(h.stages[0], steps=1)
    h.end(h.stages[0])
    h.begin(h.stages[1])
    assert moincl.targets == {} and moincl.targets_stage == "s1"


def test_distillation_terms_are_zero_when_teacher_and_student_agree():
    h, moincl = _harness(ikd_weight=1.0, text_pool="t.json", text_samples=3, T=5.0)
    pool = _samples(None, 12, "txt")
    h.ctx.load_samples = lambda manifest, root=None, limit=None: pool if manifest == "t.json" else []
    s0, s1 = h.stages
    h.run_stage(s0, steps=4, lr=3e-2)
    h.begin(s1)
    batch = h.collate(s1.train_samples[:4])
    terms = moincl.loss_terms(h.ctx, batch, h.model(batch))
    assert set(terms) == {"pseudo_ce", "pseudo_kl", "ikd"}
    assert float(terms["pseudo_kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["ikd"]) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["pseudo_ce"]) > 0.0
    # the pseudo batch is the first pseudo_num of the batch's samples with targets, in order
    pseudo = moincl.pseudo_batch([s.id for s in s1.train_samples[:6]], 4)
    assert [p.id for p in pseudo] == [f"{s.id}#pseudo-caption" for s in s1.train_samples[:4]]
    assert all(p.media == s.media for p, s in zip(pseudo, s1.train_samples))
    # once the trained weights move, both terms are positive and reach them
    params = dict(h.model.named_parameters())
    name = next(k for k in sorted(h.last_names) if ".lora_B." in k)
    with torch.no_grad():
        params[name].add_(0.5 * torch.randn_like(params[name]))
    terms = moincl.loss_terms(h.ctx, batch, h.model(batch))
    assert float(terms["pseudo_kl"]) > 1e-6 and float(terms["ikd"]) > 1e-6
    (terms["pseudo_kl"] + terms["ikd"]).backward()
    assert params[name].grad is not None and float(params[name].grad.abs().sum()) > 0
    # weights scale the terms; a zero weight removes the instruction term
    off = MoInCL(ikd_weight=0.0, fusion_alpha=1.0, kl_weight=0.0, pseudo_weight=0.0)
    off.load_state_dict(moincl.state_dict())
    off._samples = moincl._samples
    terms = off.loss_terms(h.ctx, batch, h.model(batch))
    assert "ikd" not in terms and float(terms["pseudo_ce"]) == 0.0


def test_fusion_formula_is_exact_and_only_touches_what_it_should():
    h, _ = _harness()
    s0, s1 = h.stages
    h.run_stage(s0, steps=2)
    h.begin(s1)
    teacher = h.ctx.teacher()
    old = {k: v.detach().clone() for k, v in teacher.named_parameters()}
    with torch.no_grad():
        for name, p in h.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    new = {k: v.detach().clone() for k, v in h.model.named_parameters()}
    fused = fuse_weights(h.model, teacher, 0.3, llm_only=True)
    assert fused and all(n.startswith("llm.") and ".lora_" in n for n in fused)
    for name, p in h.model.named_parameters():
        if name in fused:
            assert torch.equal(p, (1.0 - 0.3) * old[name] + 0.3 * new[name]), name
        else:
            assert torch.equal(p, new[name]), name
    assert any(n.startswith("connector.") and p.requires_grad for n, p in h.model.named_parameters())
    everything = fuse_weights(h.model, teacher, 0.0, llm_only=False)
    assert set(everything) == set(h.last_names)
    for name in everything:
        assert torch.equal(dict(h.model.named_parameters())[name], old[name])


class _Recorder(Method):
    name = "recorder"

    def __init__(self):
        super().__init__()
        self.events = []

    def after_step(self, ctx, stage, step):
        self.events.append(("step", step))

    def after_epoch(self, ctx, stage, epoch):
        self.events.append(("epoch", epoch))


def test_after_epoch_runs_after_each_epoch_and_before_the_checkpoint():
    h = Harness()
    rec = _Recorder()
    stage = h.stages[0]
    h.begin(stage)
    events = rec.events
    plan = StagePlan(stage.name, stage.index, stage.train_samples, 1, 5, 1e-3, None)  # 2 steps/epoch
    cfg = {**TRAIN_CFG, "save_every_steps": 2}
    train_stage(ctx=h.ctx, plan=plan, methods=[rec], dataset=stage.train_samples,
                collate=lambda items: h.collate(items, train=True), train_cfg=cfg, dist=Dist(),
                ds_config=None, logger=_Logger(),
                on_checkpoint=lambda step, *a: events.append(("checkpoint", step)))
    assert events == [("step", 1), ("step", 2), ("epoch", 0), ("checkpoint", 2),
                      ("step", 3), ("step", 4), ("epoch", 1), ("checkpoint", 4),
                      ("step", 5), ("epoch", 2)]


def test_fusion_runs_after_every_epoch_of_a_later_stage_only(monkeypatch):
    from mil_plugins.methods import moincl as moincl_module

    h, moincl = _harness(fusion_alpha=0.5)
    s0, s1 = h.stages
    calls = []
    monkeypatch.setattr(moincl_module, "fuse_weights",
                        lambda *a, **k: calls.append(a[2]) or fuse_weights(*a, **k))
    h.run_stage(s0, steps=4)          # 8 samples, batch 4: 2 steps per epoch
    assert calls == []                # first stage: nothing to fuse toward
    h.begin(s1)
    start = {k: v.detach().clone() for k, v in h.model.named_parameters()}
    h.train(s1, steps=4)
    assert calls == [0.5, 0.5]
    moved = [k for k, v in h.model.named_parameters() if not torch.equal(v, start[k])]
    assert any(".lora_" in k for k in moved)


def test_pseudo_targets_survive_a_resume_and_regenerate_identically(tmp_path):
    h, moincl = _harness()
    s0, s1 = h.stages
    h.run_stage(s0, steps=12, lr=3e-2)
    stage_start = {k: v.detach().clone() for k, v in h.model.named_parameters()}
    h.begin(s1)
    targets = copy.deepcopy(moincl.targets)
    h.train(s1, steps=3)
    moincl.after_step(h.ctx, s1, 3)
    state = checkpoint_roundtrip({"moincl": moincl.state_dict()}, tmp_path)["moincl"]
    # a resumed run: a new method object, the half-trained weights; train_samples keeps the targets
    again = MoInCL(ikd_weight=0.0, fusion_alpha=1.0, max_new_tokens=4)
    again.load_state_dict(state)
    again.train_samples(h.ctx, s1, list(s1.train_samples))
    assert again.targets == targets and again._step == 3
    batch = h.collate(s1.train_samples[:4])
    assert [p.id for p in again.pseudo_batch(batch["ids"], 4)] == \
        [p.id for p in moincl.pseudo_batch(batch["ids"], 4)]
    # without the state, the stage-start model regenerates exactly the same targets
    with torch.no_grad():
        for k, p in h.model.named_parameters():
            p.copy_(stage_start[k])
    fresh = MoInCL(ikd_weight=0.0, fusion_alpha=1.0, max_new_tokens=4)
    fresh.train_samples(h.ctx, s1, list(s1.train_samples))
    assert fresh.targets == targets


@pytest.mark.parametrize("options,message", [
    ({"fuse": "all"}, "fuse must be one of"),
    ({"T": 0}, "T must be > 0"),
    ({"fusion_alpha": 1.5}, "fusion_alpha must be in"),
    ({"pseudo_num": -1}, "pseudo_num must be >= 0"),
    ({"per_stage": {"s1": {"lr": 1}}}, "only"),
    ({"colour": 1}, "colour"),
])
def test_options_are_checked(options, message):
    with pytest.raises((ValueError, KeyError), match=message):
        MoInCL(**options)


def test_per_stage_options_override_the_defaults():
    m = MoInCL(fusion_alpha=0.5, per_stage={"s1": {"fusion_alpha": 0.1, "pseudo_num": 1}})
    h = Harness()
    assert m.option(h.stages[1], "fusion_alpha") == 0.1 and m.option(h.stages[1], "pseudo_num") == 1
    assert m.option(h.stages[0], "fusion_alpha") == 0.5


def test_fusion_refuses_deepspeed():
    h = Harness(setup=False)
    h.ctx.dist = type("D", (), {"deepspeed": True, "is_main": True})()
    with pytest.raises(ValueError, match="DeepSpeed"):
        MoInCL().setup(h.ctx)
    MoInCL(fuse="none").setup(h.ctx)


def test_media_tensor_of_a_pseudo_sample_is_its_sources():
    h, _ = _harness()
    s = h.stages[1].train_samples[0]
    p = ptg.as_sample(s, "<vec> say it", "a red cat", "caption")
    a, b = h.collate([s]), h.collate([p])
    assert torch.equal(a["media"][VEC], b["media"][VEC])
    assert torch.equal(a["media"][VEC][0], _media_tensor(str(s.media[VEC][0]), VEC))


def test_instruction_pool_prefers_the_text_split_then_warmup_then_text_stages(tmp_path):
    from mil_plugins.methods.text_prompts import TextPromptPool

    h = Harness(stages=(VEC, None, SEQ))
    split, warm = _samples(None, 5, "split"), _samples(None, 4, "warm")
    loaded = {"text/train.json": split, "w.json": warm, "mine.json": _samples(VEC, 3, "media")}
    h.ctx.load_samples = lambda manifest, root=None, limit=None: loaded[manifest]
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "train.json").write_text("[]")
    h.ctx.recipe = {"data": {"root": str(tmp_path)}, "warmup": {"train": "w.json"}}
    assert TextPromptPool("moincl").samples(h.ctx) == split
    (tmp_path / "text" / "train.json").unlink()
    assert TextPromptPool("moincl").samples(h.ctx) == warm
    h.ctx.recipe = {"data": {"root": str(tmp_path)}}
    assert TextPromptPool("moincl").samples(h.ctx) == h.stages[1].train_samples
    with pytest.raises(ValueError, match="'mine.json' holds no text-only samples"):
        TextPromptPool("moincl", "mine.json").samples(h.ctx)
    # draws are a function of (seed, stage, step, micro-batch)
    pool = TextPromptPool("moincl", "w.json")
    h.ctx.stage = h.stages[2]
    a, b = pool.draw(h.ctx, 3, 2, 0), pool.draw(h.ctx, 3, 2, 0)
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].shape[0] == 3
    assert len({tuple(pool.draw(h.ctx, 3, step, 0)["ids"]) for step in range(10)}) > 1

"""Unit tests of the built-in continual methods (joint, replay, ewc, lwf, expansion) on a tiny
model: each hook has its effect, loss terms appear where they should (not in the first stage),
state survives state_dict -> checkpoint encoding -> load_state_dict, and conflicts are rejected.

The harness mirrors ``Runner.run`` (before_stage -> train_samples -> trainable -> the real
``train_stage`` loop -> after_stage) with fake modalities and in-memory media."""

from __future__ import annotations

import inspect
import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _model_fixtures import SeqPlugin, VecPlugin, make_batch, make_tokenizer, registered_fakes, tiny_cfg
from mil_plugins.data.manifest import Sample
from mil_plugins.engine.checkpoint import join_tensors, split_tensors
from mil_plugins.engine.context import MethodContext, Stage, lazy_frozen_copy
from mil_plugins.engine.distributed import Dist
from mil_plugins.engine.loop import StagePlan, train_stage
from mil_plugins.engine.trainable import apply_trainable, group_names
from mil_plugins.methods._common import salt
from mil_plugins.methods.base import check_composition
from mil_plugins.methods.ewc import EWC
from mil_plugins.methods.expansion import Expansion
from mil_plugins.methods.finetune import Finetune
from mil_plugins.methods.joint import Joint
from mil_plugins.methods.lwf import LwF, distill_kl
from mil_plugins.methods.replay import Replay
from mil_plugins.methods.teacher import TeacherSource
from mil_plugins.model.build import build_model

VEC, SEQ = VecPlugin.name, SeqPlugin.name
PROMPTS = {VEC: "<vec> what is it ?", SEQ: "<seq> say it", None: "hello what is it ?"}
ANSWERS = ["cat", "dog", "red", "blue", "green", "one", "two"]
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
TRAIN_CFG = {"grad_accum": 1, "batch_size": 4, "weight_decay": 0.0, "scheduler": "constant",
             "warmup_ratio": 0.0, "max_grad_norm": 1.0, "seed": 0, "log_every_steps": 1000,
             "save_every_steps": 0}


@pytest.fixture(autouse=True, scope="module")
def _fakes():
    with registered_fakes():
        yield


def _samples(modality, n, tag):
    out = []
    for i in range(n):
        media = {modality: [Path(f"/fake/{tag}/{i}")]} if modality else {}
        conv = [{"from": "human", "value": PROMPTS[modality]},
                {"from": "gpt", "value": ANSWERS[(i + len(tag)) % len(ANSWERS)]}]
        out.append(Sample(id=f"{tag}-{i}", conversations=conv, media=media, task="t",
                          metric="exact_match", index=i))
    return out


def _media_tensor(sample_id, modality):
    g = torch.Generator().manual_seed(zlib.crc32(f"{sample_id}/{modality}".encode()))
    shape = (6,) if modality == VEC else (3, 5)
    return torch.randn(*shape, generator=g)


class _Logger:
    def log(self, record):
        pass


class Harness:
    """A tiny model, stages of fake samples, a MethodContext, and a Runner-like stage driver."""

    def __init__(self, methods=(), stages=(VEC, SEQ), n=8, mode="shared", lora=None,
                 trainable=("connector",), setup=True):
        torch.manual_seed(0)
        tok = make_tokenizer()
        self.model = build_model(tiny_cfg(tok, mode, lora=lora), tok)
        self.base_names = {k for k, _ in self.model.named_parameters()}
        self.trainable_groups = list(trainable)
        self.stages = [Stage(i, f"s{i}", m, train_samples=_samples(m, n, f"s{i}"),
                             test_samples=_samples(m, 4, f"t{i}"),
                             config={"trainable": None}) for i, m in enumerate(stages)]
        self.ctx = MethodContext(model=self.model, recipe={"train": {"trainable": list(trainable)}},
                                 stages=self.stages, dist=Dist(), output_dir=Path("."), seed=0,
                                 make_loader=self.make_loader,
                                 resolve_groups=lambda groups, m: group_names(self.model, groups, m))
        self.methods = list(methods)
        self.ever_trained: set[str] = set()
        self.last_samples: list = []
        self.last_names: set[str] = set()
        if setup:
            torch.manual_seed(1)
            for m in self.methods:
                m.setup(self.ctx)

    # ---- data -------------------------------------------------------------------------------
    def collate(self, samples, train=True):
        items = []
        for s in samples:
            mods = [m for m, files in s.media.items() if files]
            prompt = s.conversations[0]["value"]
            answer = s.conversations[1]["value"] if train else None
            items.append((prompt, answer, {m: [_media_tensor(s.id, m)] for m in mods}))
        batch = make_batch(self.model, items, train=train)
        batch["modalities"] = [[m for m, files in s.media.items() if files] for s in samples]
        batch["ids"] = [s.id for s in samples]
        batch["answers"] = [s.conversations[1]["value"] for s in samples]
        batch["tasks"] = [s.task for s in samples]
        batch["metrics"] = [s.metric for s in samples]
        return batch

    def make_loader(self, samples, mode="eval", batch_size=16):
        for start in range(0, len(samples), batch_size):
            yield self.collate(samples[start:start + batch_size], train=mode == "train")

    # ---- the Runner's stage sequence ----------------------------------------------------------
    def begin(self, stage):
        self.ctx.stage = stage
        for m in self.methods:
            m.before_stage(self.ctx, stage)
        self.ctx._teacher = TeacherSource(self.model)  # as the engine: after before_stage
        samples = list(stage.train_samples)
        for m in self.methods:
            samples = m.train_samples(self.ctx, stage, samples)
        names = group_names(self.model, self.trainable_groups, stage.modality)
        for m in self.methods:
            names = set(m.trainable(self.ctx, stage, set(names)))
        self.last_samples, self.last_names = samples, names
        apply_trainable(self.model, names)
        self.ctx._teacher.seal(names)  # as the engine: just before training
        self.ever_trained |= names
        return samples, names

    def train(self, stage, steps=3, lr=5e-3):
        samples, _ = self.last_samples, self.last_names
        plan = StagePlan(stage.name, stage.index, samples, 1, steps, lr, None)
        return train_stage(ctx=self.ctx, plan=plan, methods=self.methods, dataset=samples,
                           collate=lambda items: self.collate(items, train=True),
                           train_cfg=TRAIN_CFG, dist=Dist(), ds_config=None, logger=_Logger())

    def end(self, stage):
        for m in self.methods:
            m.after_stage(self.ctx, stage)
        self.ctx._teacher = None
        self.ctx.seen = self.stages[: stage.index + 1]

    def run_stage(self, stage, steps=3, lr=5e-3):
        self.begin(stage)
        result = self.train(stage, steps, lr)
        self.end(stage)
        return result

    # ---- checks -------------------------------------------------------------------------------
    @torch.no_grad()
    def loss(self, stage):
        self.model.eval()
        batch = self.collate(stage.test_samples, train=True)
        for m in self.methods:
            m.before_forward(self.ctx, batch)
        return float(self.model(batch).loss)

    def saved_weights(self):
        return {k: v.detach().clone() for k, v in self.model.named_parameters()
                if k in self.ever_trained or k not in self.base_names}


def checkpoint_roundtrip(states: dict, tmp_path: Path) -> dict:
    """What the checkpoint does to method states: JSON for structure, safetensors for tensors."""
    tensors: dict = {}
    encoded = json.loads(json.dumps(split_tensors(states, tensors)))
    save_file(tensors, str(tmp_path / "methods.safetensors"))
    return join_tensors(encoded, load_file(str(tmp_path / "methods.safetensors")))


def restore(h: Harness, states: dict, weights: dict) -> None:
    """Session.restore: methods' load_state_dict first, then the weights on top."""
    for m in h.methods:
        m.load_state_dict(states.get(m.name, {}))
    params = dict(h.model.named_parameters())
    missing = [k for k in weights if k not in params]
    assert not missing, missing
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)


# ==================================================================================================
# finetune / joint
# ==================================================================================================
def test_finetune_is_all_no_ops():
    h = Harness([Finetune()], setup=True)
    st = h.stages[1]
    samples, names = h.begin(st)
    assert samples == st.train_samples
    assert names == group_names(h.model, ["connector"], SEQ)


def test_joint_cumulative_and_all():
    h = Harness([Joint()], stages=(VEC, SEQ, VEC), setup=False)
    s0, s1, s2 = h.stages
    j = h.methods[0]
    assert j.train_samples(h.ctx, s0, list(s0.train_samples)) == s0.train_samples
    got = j.train_samples(h.ctx, s2, list(s2.train_samples))
    assert got[: len(s2.train_samples)] == s2.train_samples
    assert {s.id for s in got} == {s.id for st in h.stages for s in st.train_samples}
    mid = j.train_samples(h.ctx, s1, list(s1.train_samples))
    assert {s.id for s in mid} == {s.id for st in (s0, s1) for s in st.train_samples}
    everything = Joint(mode="all").train_samples(h.ctx, s0, list(s0.train_samples))
    assert len(everything) == sum(len(st.train_samples) for st in h.stages)
    with pytest.raises(ValueError, match="mode"):
        Joint(mode="sometimes")


def test_joint_trains_mixed_batches_end_to_end():
    h = Harness([Joint()])
    h.run_stage(h.stages[0], steps=2)
    samples, _ = h.begin(h.stages[1])
    assert len(samples) == 16
    result = h.train(h.stages[1], steps=2)
    assert result["steps"] == 2


# ==================================================================================================
# replay
# ==================================================================================================
def test_replay_ratio_buffer_concat_and_resume(tmp_path):
    h = Harness([Replay(ratio=0.25)], stages=(VEC, SEQ, VEC), setup=False)
    r = h.methods[0]
    s0, s1, s2 = h.stages
    h.ctx.stage = s0
    assert r.train_samples(h.ctx, s0, list(s0.train_samples)) == s0.train_samples  # empty buffer
    r.after_stage(h.ctx, s0)
    assert len(r.memory) == 2 and {e[0] for e in r.memory} == {"s0"}
    h.ctx.stage = s1
    got = r.train_samples(h.ctx, s1, list(s1.train_samples))
    assert got[:8] == s1.train_samples
    replayed = got[8:]
    assert len(replayed) == 2 and all(s in s0.train_samples for s in replayed)
    r.after_stage(h.ctx, s1)
    assert len(r.memory) == 4

    # the same seed draws the same buffer; a fresh instance restored from the state replays it
    again = Replay(ratio=0.25)
    for st in (s0, s1):
        h.ctx.stage = st
        again.after_stage(h.ctx, st)
    assert again.memory == r.memory
    state = checkpoint_roundtrip({"replay": r.state_dict()}, tmp_path)["replay"]
    fresh = Replay(ratio=0.25)
    fresh.load_state_dict(state)
    h.ctx.stage = s2
    assert fresh.train_samples(h.ctx, s2, []) == r.train_samples(h.ctx, s2, [])
    # a different seed draws a different buffer (8 choose 2 ways: equal by chance is unlikely)
    other = Harness(stages=(VEC, SEQ), setup=False)
    other.ctx.seed = 12345
    draws = set()
    for seed in (12345, 7, 99):
        other.ctx.seed, other.ctx.stage = seed, other.stages[0]
        rr = Replay(ratio=0.25)
        rr.after_stage(other.ctx, other.stages[0])
        draws.add(tuple(e[1] for e in rr.memory))
    assert len(draws) > 1


def test_replay_resolves_by_id_and_rejects_missing_samples():
    h = Harness(stages=(VEC, SEQ), setup=False)
    r = Replay(ratio=0.25)
    h.ctx.stage = h.stages[0]
    r.after_stage(h.ctx, h.stages[0])
    wanted = {e[2] for e in r.memory}
    h.stages[0].train_samples.reverse()  # indices moved: found again by id
    assert {s.id for s in r.train_samples(h.ctx, h.stages[1], [])} == wanted
    h.stages[0].train_samples[:] = [s for s in h.stages[0].train_samples if s.id not in wanted]
    with pytest.raises(KeyError, match="not in that stage's training data"):
        r.train_samples(h.ctx, h.stages[1], [])


def test_replay_fixed_size_reservoir_and_balanced():
    h = Harness(stages=(VEC, SEQ, VEC, SEQ), n=10, setup=False)
    res, bal = Replay(size=6), Replay(size=6, strategy="balanced")
    for st in h.stages:
        h.ctx.stage = st
        res.after_stage(h.ctx, st)
        bal.after_stage(h.ctx, st)
        assert len(res.memory) <= 6 and len(bal.memory) <= 6
    assert len(res.memory) == 6 and res.counts == {"all": 40}
    assert len({tuple(e) for e in res.memory}) == 6
    groups = {g: len(p) for g, p in bal.pools.items()}
    assert groups == {VEC: 3, SEQ: 3}
    # balanced after the first stage only: the single group has every slot
    first = Replay(size=6, strategy="balanced")
    h.ctx.stage = h.stages[0]
    first.after_stage(h.ctx, h.stages[0])
    assert len(first.memory) == 6
    h.ctx.stage = h.stages[1]
    first.after_stage(h.ctx, h.stages[1])  # the new modality takes half, by eviction
    assert {g: len(p) for g, p in first.pools.items()} == {VEC: 3, SEQ: 3}
    # ratio + balanced: a mixed stage's quota is split over its modalities
    mixed = Stage(9, "mixed", None, train_samples=_samples(VEC, 6, "mv") + _samples(SEQ, 6, "ms"))
    h.ctx.stages = h.stages + [mixed]
    rb = Replay(ratio=0.5, strategy="balanced")
    h.ctx.stage = mixed
    rb.after_stage(h.ctx, mixed)
    assert {g: len(p) for g, p in rb.pools.items()} == {SEQ: 3, VEC: 3}


def test_replay_options_validated():
    with pytest.raises(ValueError, match="strategy"):
        Replay(strategy="fifo")
    with pytest.raises(ValueError, match="mix"):
        Replay(mix="interleave")
    with pytest.raises(ValueError, match="size"):
        Replay(size=-1)
    with pytest.raises(ValueError, match="unknown option"):
        Replay(buffer=3)


def test_salt_is_process_independent():
    assert salt("replay", "s0") == zlib.crc32("replay\x1fs0".encode())


# ==================================================================================================
# ewc
# ==================================================================================================
def test_ewc_fisher_anchor_and_penalty(tmp_path):
    h = Harness([EWC(**{"lambda": 10.0, "fisher_samples": 4})])
    ewc = h.methods[0]
    s0, s1 = h.stages
    h.begin(s0)
    batch = h.collate(s0.train_samples[:2])
    assert ewc.loss_terms(h.ctx, batch, h.model(batch)) == {}  # first stage: no penalty
    h.train(s0, steps=3)
    h.end(s0)
    trained0 = {k for k, p in h.model.named_parameters() if p.requires_grad}
    assert len(ewc.penalties) == 1
    fisher, anchor = ewc.penalties[0]["fisher"], ewc.penalties[0]["anchor"]
    assert set(fisher) == set(anchor) == trained0
    assert all(bool((f >= 0).all()) for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    assert all(p.grad is None for p in h.model.parameters())  # the Fisher pass leaves no grads

    h.begin(s1)
    batch = h.collate(s1.train_samples[:2])
    terms = ewc.loss_terms(h.ctx, batch, h.model(batch))
    assert float(terms["penalty"].detach()) == pytest.approx(0.0, abs=1e-12)  # at the anchor
    params = dict(h.model.named_parameters())
    with torch.no_grad():
        params["connector.shared.0.weight"].add_(0.1)
    terms = ewc.loss_terms(h.ctx, batch, h.model(batch))
    now = {k for k, p in params.items() if p.requires_grad}
    expected = 0.5 * 10.0 * sum(float((fisher[k] * (params[k].detach() - anchor[k]) ** 2).sum())
                                for k in fisher if k in now)
    assert float(terms["penalty"].detach()) == pytest.approx(expected, rel=1e-5) and expected > 0
    assert f"connector.input_layers.{VEC}.weight" not in now  # frozen now: not penalised
    terms["penalty"].backward()
    assert params["connector.shared.0.weight"].grad is not None
    h.model.zero_grad(set_to_none=True)

    # state -> checkpoint encoding -> a fresh instance gives the same penalty
    state = checkpoint_roundtrip({"ewc": ewc.state_dict()}, tmp_path)["ewc"]
    fresh = EWC(**{"lambda": 10.0})
    fresh.load_state_dict(state)
    again = fresh.loss_terms(h.ctx, batch, None)
    assert float(again["penalty"]) == pytest.approx(float(terms["penalty"]), rel=1e-6)


def test_ewc_online_keeps_one_decayed_fisher():
    h = Harness([EWC(online=True, gamma=0.5, fisher_samples=2)], stages=(VEC, SEQ, VEC))
    ewc = h.methods[0]
    h.run_stage(h.stages[0], steps=1)
    f0 = {k: v.clone() for k, v in ewc.penalties[0]["fisher"].items()}
    h.run_stage(h.stages[1], steps=1)
    assert len(ewc.penalties) == 1
    merged = ewc.penalties[0]["fisher"]
    # the VEC input layer was not trained in stage 1: its Fisher is decayed, its anchor kept
    k = f"connector.input_layers.{VEC}.weight"
    assert torch.allclose(merged[k], 0.5 * f0[k])
    assert f"connector.input_layers.{SEQ}.weight" in merged
    shared = "connector.shared.0.weight"
    assert bool((merged[shared] >= 0.5 * f0[shared] - 1e-12).all())
    plain = Harness([EWC(fisher_samples=2)], stages=(VEC, SEQ))
    for st in plain.stages:
        plain.run_stage(st, steps=1)
    assert len(plain.methods[0].penalties) == 2


def test_ewc_regularises_training_toward_the_anchor():
    """Same data and seed: with EWC the shared connector moves less away from its anchor."""
    drift = {}
    for lam in (0.0, 1e5):
        h = Harness([EWC(**{"lambda": lam, "fisher_samples": 8})])
        h.run_stage(h.stages[0], steps=3)
        anchor = dict(h.methods[0].penalties[0]["anchor"])
        h.run_stage(h.stages[1], steps=4, lr=2e-2)
        p = dict(h.model.named_parameters())
        drift[lam] = sum(float(((p[k].detach() - anchor[k]) ** 2).sum())
                         for k in anchor if k.startswith("connector.shared."))
    assert drift[1e5] < drift[0.0]


# ==================================================================================================
# lwf
# ==================================================================================================
def test_distill_kl_uses_answer_positions_only():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 3], labels[1, 4] = 1, 2
    base = distill_kl(s, t, labels, 2.0)
    assert float(base) > 0
    s2 = s.clone()
    s2[:, 0, 0] += 5.0  # position 0 predicts labels[:, 1] (masked): no change
    assert float(distill_kl(s2, t, labels, 2.0)) == pytest.approx(float(base))
    s2[0, 2, 0] += 5.0  # position 2 predicts labels[0, 3]: changes
    assert float(distill_kl(s2, t, labels, 2.0)) != pytest.approx(float(base))
    assert float(distill_kl(t, t, labels, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_kl(s, t, torch.full((2, 5), -100), 2.0)) == 0.0


def test_lwf_absent_first_stage_then_distils_teacher():
    h = Harness([LwF(T=2.0, alpha=0.5, distill="answers")])
    lwf = h.methods[0]
    s0, s1 = h.stages
    h.begin(s0)
    batch = h.collate(s0.train_samples[:4])
    assert lwf.loss_terms(h.ctx, batch, h.model(batch)) == {}  # nothing learned yet
    h.train(s0, steps=2)
    h.end(s0)
    h.begin(s1)
    batch = h.collate(s1.train_samples[:4])
    terms = lwf.loss_terms(h.ctx, batch, h.model(batch))
    assert float(terms["kd"]) == pytest.approx(0.0, abs=1e-6)  # the student is the teacher
    with torch.no_grad():
        dict(h.model.named_parameters())["connector.shared.2.weight"].mul_(3.0)
    terms = lwf.loss_terms(h.ctx, batch, h.model(batch))
    assert float(terms["kd"]) > 1e-6
    terms["kd"].backward()
    assert dict(h.model.named_parameters())["connector.shared.2.weight"].grad is not None
    assert all(p.grad is None for p in h.ctx.teacher().parameters())
    h.model.zero_grad(set_to_none=True)
    assert LwF(alpha=0.0).loss_terms(h.ctx, batch, h.model(batch)) == {}
    assert lwf.state_dict() == {}
    with pytest.raises(ValueError, match="T must be"):
        LwF(T=0)
    with pytest.raises(ValueError, match="distill"):
        LwF(distill="logits")


def _text_harness(**options):
    h = Harness([LwF(**options)], lora=LORA, trainable=("connector", "lora"))
    pool = _samples(None, 12, "txt")
    h.ctx.load_samples = lambda manifest, root=None, limit=None: pool if manifest == "t.json" else []
    return h, pool


def test_masked_kl_zero_for_equal_logits_and_masked_positions_ignored():
    from mil_plugins.methods.lwf import masked_kl

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert float(masked_kl(t, t, mask, 2.0)) == pytest.approx(0.0, abs=1e-6)
    base = float(masked_kl(s, t, mask, 2.0))
    s2 = s.clone()
    s2[0, 0, 0] += 5.0  # padding: ignored
    assert float(masked_kl(s2, t, mask, 2.0)) == pytest.approx(base)
    s2[1, 1, 0] += 5.0
    assert float(masked_kl(s2, t, mask, 2.0)) != pytest.approx(base)


def test_lwf_text_distillation_on_text_prompts_zero_when_teacher_is_student(tmp_path):
    h, pool = _text_harness(T=2.0, text_pool="t.json", text_samples=3)
    lwf = h.methods[0]
    s0, s1 = h.stages
    h.run_stage(s0, steps=2)
    h.begin(s1)
    batch = h.collate(s1.train_samples[:4])
    terms = lwf.loss_terms(h.ctx, batch, h.model(batch))
    assert set(terms) == {"kd_text"}  # the new task's answer positions are not distilled
    assert float(terms["kd_text"]) == pytest.approx(0.0, abs=1e-6)  # teacher == student
    # the prompts are text-only samples of the pool, drawn by (seed, stage, step)
    drawn = lwf._text_batch(h.ctx)
    assert drawn["input_ids"].shape[0] == 3 and not drawn.get("media")
    assert torch.equal(drawn["input_ids"], lwf._text_batch(h.ctx)["input_ids"])
    # a change of what the stage trains in the LLM (text prompts go through it) is penalised and
    # gets gradients; the teacher shares the frozen weights, keeps its own copy of the trained ones
    params = dict(h.model.named_parameters())
    name = next(k for k in sorted(h.last_names) if ".lora_B." in k)
    frozen = next(k for k in params if k not in h.last_names and k.startswith("llm."))
    teacher = h.ctx.teacher()
    assert dict(teacher.named_parameters())[frozen] is params[frozen]  # shared, not copied
    assert dict(teacher.named_parameters())[name] is not params[name]
    with torch.no_grad():
        params[name].add_(0.5 * torch.randn_like(params[name]))
    terms = lwf.loss_terms(h.ctx, batch, h.model(batch))
    assert float(terms["kd_text"]) > 1e-6
    terms["kd_text"].backward()
    assert params[name].grad is not None
    h.model.zero_grad(set_to_none=True)
    # the step counter is state: a resumed stage draws the same prompts
    lwf.after_step(h.ctx, s1, 3)
    again = LwF(text_pool="t.json", text_samples=3)
    again.load_state_dict(checkpoint_roundtrip({"lwf": lwf.state_dict()}, tmp_path)["lwf"])
    again._pool = pool
    assert torch.equal(again._text_batch(h.ctx)["input_ids"], lwf._text_batch(h.ctx)["input_ids"])
    both = LwF(distill="text+answers", text_pool="t.json")
    both._pool = pool
    assert set(both.loss_terms(h.ctx, batch, h.model(batch))) == {"kd", "kd_text"}


def test_lwf_text_pool_falls_back_to_text_stages_and_errors_when_empty():
    h = Harness([LwF()], stages=(VEC, None, SEQ))
    assert {s.id for s in h.methods[0]._text_pool(h.ctx)} == {s.id for s in h.stages[1].train_samples}
    empty = Harness([LwF()])
    with pytest.raises(ValueError, match="no text-only prompts"):
        empty.methods[0]._text_pool(empty.ctx)


def test_teacher_source_shares_frozen_weights_and_keeps_stage_start_values():
    h = Harness()
    s0 = h.stages[0]
    _, names = h.begin(s0)
    before = h.loss(s0)
    h.train(s0, steps=3, lr=2e-2)
    assert h.loss(s0) != pytest.approx(before)
    teacher = h.ctx.teacher()
    t_params, params = dict(teacher.named_parameters()), dict(h.model.named_parameters())
    for k, p in params.items():
        assert (t_params[k] is p) == (k not in names), k
    assert not any(p.requires_grad for k, p in t_params.items() if k in names)
    with torch.no_grad():
        batch = h.collate(s0.test_samples, train=True)
        assert float(teacher(batch).loss) == pytest.approx(before, rel=1e-6)
    # rebuilt on resume from the saved stage-start values: the same teacher
    again = TeacherSource(h.model)
    again.seal(names, saved=h.ctx._teacher.tensors())
    with torch.no_grad():
        assert float(again.get()(batch).loss) == pytest.approx(before, rel=1e-6)
    with pytest.raises(KeyError, match="lack trainable"):
        TeacherSource(h.model).seal(names | {"connector.shared.0.bias"}, saved={})


# ==================================================================================================
# expansion
# ==================================================================================================
def _vec_features(seed=3):
    return torch.randn(2, 2, 12, generator=torch.Generator().manual_seed(seed))


def _seq_features(seed=4):
    return torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(seed))


def _bare(model, modality, x):
    """The connector path without any adapter (the modules called directly: no hooks)."""
    layer = model.connector.input_layers[modality]
    x = torch.nn.functional.linear(x, layer.weight, layer.bias)
    for module in model.connector.shared:
        x = module(x)
    return x


def test_expansion_connector_adapters_trainable_sets_and_isolation():
    h = Harness([Expansion()])
    e = h.methods[0]
    assert e.targets == ["connector"]
    names = {k for k, _ in h.model.named_parameters()}
    for key in ("stage0", "stage1"):
        assert f"connector.expansion.adapters.{key}.down.weight" in names
    s0, s1 = h.stages
    with torch.no_grad():  # a fresh adapter is a no-op
        bare = _bare(h.model, VEC, _vec_features())
        assert torch.allclose(h.model.project(VEC, _vec_features(), "features"), bare)

    _, n0 = h.begin(s0)
    assert {k for k in n0 if k.startswith("connector.shared.")}  # base trains in the first stage
    assert "connector.expansion.adapters.stage0.up.weight" in n0
    assert not {k for k in n0 if "stage1" in k}
    h.train(s0, steps=3)
    h.end(s0)
    with torch.no_grad():
        vec_after0 = h.model.project(VEC, _vec_features(), "features").clone()
    _, n1 = h.begin(s1)
    assert not {k for k in n1 if k.startswith("connector.shared.")}  # base frozen after stage 0
    assert not {k for k in n1 if "stage0" in k}
    assert {k for k in n1 if "stage1" in k} == {"connector.expansion.adapters.stage1.down.weight",
                                                 "connector.expansion.adapters.stage1.up.weight"}
    assert f"connector.input_layers.{SEQ}.weight" in n1  # the recipe's other choices stay
    h.train(s1, steps=3, lr=2e-2)
    h.end(s1)
    with torch.no_grad():
        assert torch.equal(h.model.project(VEC, _vec_features(), "features"), vec_after0)
        assert float(h.model.connector.expansion.adapters["stage1"].up.weight.abs().sum()) > 0
    assert e.routes == {VEC: ["stage0"], SEQ: ["stage1"]}


def test_expansion_routes_per_modality_and_teacher_has_its_own_adapters():
    h = Harness([Expansion()])
    e = h.methods[0]
    for st in h.stages:
        e.before_stage(h.ctx, st)
    stack = h.model.connector.expansion
    with torch.no_grad():
        stack.adapters["stage1"].up.weight.normal_()
        seq_bare = _bare(h.model, SEQ, _seq_features())
        vec_bare = _bare(h.model, VEC, _vec_features())
        assert not torch.allclose(h.model.project(SEQ, _seq_features(), "features"), seq_bare)
        assert torch.allclose(h.model.project(VEC, _vec_features(), "features"), vec_bare)
    # a batch mixing both modalities is routed per sample (connector target)
    batch = h.collate([h.stages[0].train_samples[0], h.stages[1].train_samples[0]])
    e.before_forward(h.ctx, batch)
    assert torch.isfinite(h.model(batch).loss)
    # the engine's teacher (a deepcopy) routes through its own copy of the adapters
    teacher = lazy_frozen_copy(h.model)()
    with torch.no_grad():
        before = teacher.project(SEQ, _seq_features(), "features").clone()
        stack.adapters["stage1"].up.weight.add_(1.0)
        assert torch.equal(teacher.project(SEQ, _seq_features(), "features"), before)
        assert not torch.allclose(h.model.project(SEQ, _seq_features(), "features"), before)


def test_expansion_state_recreates_adapters_and_accepts_weights(tmp_path):
    h = Harness([Expansion(rank=4)])
    for st in h.stages:
        h.run_stage(st, steps=2, lr=2e-2)
    losses = [h.loss(st) for st in h.stages]
    states = checkpoint_roundtrip({"expansion": h.methods[0].state_dict()}, tmp_path)
    weights = h.saved_weights()
    assert any(k.startswith("connector.expansion.") for k in weights)

    # the usual resume: a rebuilt Session runs setup (all adapters), then restore
    fresh = Harness([Expansion(rank=4)])
    restore(fresh, states, weights)
    assert fresh.methods[0].routes == {VEC: ["stage0"], SEQ: ["stage1"]}
    assert [fresh.loss(st) for st in fresh.stages] == pytest.approx(losses, rel=1e-6)

    # a model whose setup knew fewer stages: load_state_dict re-creates the missing adapter
    short = Harness([Expansion(rank=4)], setup=False)
    short.ctx.stages = short.stages[:1]
    torch.manual_seed(1)
    short.methods[0].setup(short.ctx)
    assert "stage1" not in short.model.connector.expansion.adapters
    short.ctx.stages = short.stages
    restore(short, states, weights)
    assert "stage1" in short.model.connector.expansion.adapters
    assert [short.loss(st) for st in short.stages] == pytest.approx(losses, rel=1e-6)

    bad = Harness([Expansion(rank=2)])
    with pytest.raises(ValueError, match="rank"):
        bad.methods[0].load_state_dict(states["expansion"])


def test_expansion_returning_modality_starts_from_its_previous_adapter():
    h = Harness([Expansion()], stages=(VEC, SEQ, VEC))
    e = h.methods[0]
    h.run_stage(h.stages[0], steps=2, lr=2e-2)
    h.run_stage(h.stages[1], steps=1)
    stack = h.model.connector.expansion
    e.before_stage(h.ctx, h.stages[2])
    assert torch.equal(stack.adapters["stage2"].up.weight, stack.adapters["stage0"].up.weight)
    assert e.routes[VEC] == ["stage0", "stage2"]  # the earlier adapter stays routable
    # before_stage again (a resumed stage) does not copy over the adapter being trained
    with torch.no_grad():
        stack.adapters["stage2"].up.weight.add_(1.0)
    e.before_stage(h.ctx, h.stages[2])
    assert not torch.equal(stack.adapters["stage2"].up.weight, stack.adapters["stage0"].up.weight)


def _two_distributions(sample_id, modality):
    """VEC inputs of stage 0 / test set 0 and of stage 2 / test set 2 come from different
    distributions (the same modality returning with other data)."""
    x = 0.3 * _plain_media_tensor(sample_id, modality)
    if modality == VEC and sample_id.split("-")[0] in ("s2", "t2"):
        x[3:] += 2.0
    elif modality == VEC:
        x[:3] += 2.0
    return x


_plain_media_tensor = _media_tensor


def test_expansion_returning_modality_keeps_its_earlier_adapter_reachable(monkeypatch):
    """image -> video -> image again: both image adapters stay; each item is routed to the stage
    whose data its own features resemble, so stage 0's behaviour survives stage 2 exactly."""
    from mil_plugins.methods.expansion import choose_adapters

    monkeypatch.setitem(globals(), "_media_tensor", _two_distributions)
    h = Harness([Expansion()], stages=(VEC, SEQ, VEC))
    e, stack = h.methods[0], h.model.connector.expansion
    s0, s1, s2 = h.stages
    h.run_stage(s0, steps=3, lr=2e-2)
    loss0 = h.loss(s0)
    h.run_stage(s1, steps=2, lr=2e-2)
    h.begin(s2)
    assert stack.forced == {VEC: "stage2"}  # its own stage's samples train the new adapter
    h.train(s2, steps=3, lr=5e-2)
    h.end(s2)
    assert e.routes[VEC] == ["stage0", "stage2"] and not stack.forced
    assert set(e.descriptors) == {"stage0", "stage1", "stage2"}
    assert not torch.equal(stack.adapters["stage2"].up.weight, stack.adapters["stage0"].up.weight)

    def routed(samples):
        batch = h.collate(samples, train=False)
        with torch.no_grad():
            h.model.project(VEC, batch["media"][VEC], batch["media_kind"][VEC])
        return list(stack.choice)

    assert routed(s0.test_samples) == ["stage0"] * 4
    assert routed(s2.test_samples) == ["stage2"] * 4
    mixed = [s0.test_samples[0], s2.test_samples[0], s0.test_samples[1]]
    assert routed(mixed) == ["stage0", "stage2", "stage0"]  # per item, in one batch
    assert h.loss(s0) == pytest.approx(loss0, rel=1e-6)  # the old adapter is still the one used

    # routing reads the input only: another stage, other task labels, other modality lists give
    # the same choice and the same predictions
    batch = h.collate(mixed)
    with torch.no_grad():
        ref = h.model(batch).logits
        h.ctx.stage = s1
        batch["tasks"] = ["other"] * 3
        batch["ids"] = ["x", "y", "z"]
        assert torch.equal(h.model(batch).logits, ref)
    params = list(inspect.signature(choose_adapters).parameters)
    assert params == ["features", "keys", "descriptors"]


def test_expansion_lora_target_routes_a_returning_modality_from_its_features(monkeypatch):
    monkeypatch.setitem(globals(), "_media_tensor", _two_distributions)
    h = Harness([Expansion()], lora=LORA, trainable=("lora",), stages=(VEC, SEQ, VEC))
    e = h.methods[0]
    s0, s1, s2 = h.stages
    h.run_stage(s0, steps=3, lr=2e-2)
    loss0 = h.loss(s0)
    h.run_stage(s1, steps=1)
    h.run_stage(s2, steps=3, lr=5e-2)
    assert e.routes[VEC] == ["stage0", "stage2"]
    from peft.tuners.tuners_utils import BaseTunerLayer
    layer = next(m for m in h.model.llm.modules() if isinstance(m, BaseTunerLayer))
    e.before_forward(h.ctx, h.collate(s2.test_samples))
    assert list(layer.active_adapters) == ["default", "stage2"]
    e.before_forward(h.ctx, h.collate(s0.test_samples))
    assert list(layer.active_adapters) == ["default", "stage0"]
    assert h.loss(s0) == pytest.approx(loss0, rel=1e-6)
    with pytest.raises(ValueError, match="mixes"):
        e.before_forward(h.ctx, h.collate([s0.test_samples[0], s2.test_samples[0]]))


def test_expansion_lora_target_routing_and_isolation(tmp_path):
    h = Harness([Expansion()], lora=LORA, trainable=("lora",))
    e = h.methods[0]
    assert e.targets == ["lora"] and e.base_adapters == ["default"]
    s0, s1 = h.stages
    _, n0 = h.begin(s0)
    assert any(".lora_A.default." in k for k in n0) and any(".lora_A.stage0." in k for k in n0)
    assert not any(".stage1." in k for k in n0)
    batch = h.collate(s0.train_samples[:2])
    flags = {k: p.requires_grad for k, p in h.model.named_parameters()}
    e.before_forward(h.ctx, batch)
    from peft.tuners.tuners_utils import BaseTunerLayer
    layer = next(m for m in h.model.llm.modules() if isinstance(m, BaseTunerLayer))
    assert list(layer.active_adapters) == ["default", "stage0"]
    assert flags == {k: p.requires_grad for k, p in h.model.named_parameters()}
    h.train(s0, steps=3, lr=2e-2)
    h.end(s0)
    vec_loss = h.loss(s0)
    _, n1 = h.begin(s1)
    lora1 = {k for k in n1 if ".lora_" in k}
    assert lora1 and all(".stage1." in k for k in lora1)
    h.train(s1, steps=3, lr=2e-2)
    h.end(s1)
    assert h.loss(s0) == pytest.approx(vec_loss, rel=1e-6)  # VEC still runs default + stage0
    e.before_forward(h.ctx, h.collate(s1.test_samples))
    assert list(layer.active_adapters) == ["default", "stage1"]
    mixed = h.collate([s0.train_samples[0], s1.train_samples[0]])
    with pytest.raises(ValueError, match="mixes"):
        e.before_forward(h.ctx, mixed)
    # resume into a rebuilt model
    states = checkpoint_roundtrip({"expansion": e.state_dict()}, tmp_path)
    fresh = Harness([Expansion()], lora=LORA, trainable=("lora",))
    restore(fresh, states, h.saved_weights())
    assert fresh.loss(s0) == pytest.approx(vec_loss, rel=1e-6)
    assert fresh.loss(s1) == pytest.approx(h.loss(s1), rel=1e-6)


def test_expansion_target_errors():
    h = Harness([Expansion(target="connector")], mode="per_modality", setup=False)
    with pytest.raises(ValueError, match="shared"):
        h.methods[0].setup(h.ctx)
    with pytest.raises(ValueError, match="nothing to expand"):
        Expansion().setup(h.ctx)
    with pytest.raises(ValueError, match="needs model.lora"):
        Expansion(target="lora").setup(Harness(setup=False).ctx)
    with pytest.raises(ValueError, match="target"):
        Expansion(target="everywhere")
    with pytest.raises(ValueError, match="train_base"):
        Expansion(train_base="always")


def test_expansion_train_base_never_freezes_base_from_the_start():
    h = Harness([Expansion(train_base="never")])
    _, n0 = h.begin(h.stages[0])
    assert not {k for k in n0 if k.startswith("connector.shared.")}
    assert "connector.expansion.adapters.stage0.up.weight" in n0


# ==================================================================================================
# composition
# ==================================================================================================
@pytest.mark.parametrize("combo", [("replay", "joint"), ("joint", "replay"), ("expansion", "replay"),
                                   ("joint", "expansion")])
def test_conflicting_combinations_are_rejected(combo):
    classes = {"replay": Replay, "joint": Joint, "expansion": Expansion}
    with pytest.raises(ValueError, match="cannot be combined"):
        check_composition([classes[n]() for n in combo])


@pytest.mark.parametrize("combo", [("replay", "ewc"), ("replay", "lwf"), ("ewc", "lwf"),
                                   ("expansion", "ewc"), ("expansion", "lwf"),
                                   ("finetune", "replay", "ewc", "lwf")])
def test_compatible_combinations_are_accepted(combo):
    classes = {"replay": Replay, "ewc": EWC, "lwf": LwF, "expansion": Expansion,
               "finetune": Finetune}
    check_composition([classes[n]() for n in combo])


def test_replay_with_ewc_and_lwf_compose_in_training():
    h = Harness([Replay(ratio=0.5), EWC(fisher_samples=2), LwF(distill="answers")])
    logged = {}

    class Logger:
        def log(self, record):
            logged.update(record)

    h.run_stage(h.stages[0], steps=2)
    samples, _ = h.begin(h.stages[1])
    assert len(samples) == 8 + 4
    plan = StagePlan("s1", 1, samples, 1, 2, 5e-3, None)
    cfg = dict(TRAIN_CFG, log_every_steps=1)
    train_stage(ctx=h.ctx, plan=plan, methods=h.methods, dataset=samples,
                collate=lambda items: h.collate(items), train_cfg=cfg, dist=Dist(),
                ds_config=None, logger=Logger())
    assert "ewc/penalty" in logged and "lwf/kd" in logged
    assert logged["lwf/kd"] > 0 and logged["ewc/penalty"] >= 0
    h.end(h.stages[1])
    assert len(h.methods[0].memory) == 4 + 4 and len(h.methods[1].penalties) == 2


def test_joint_and_replay_train_the_parts_of_every_modality_they_mix_in():
    """Samples of earlier modalities mixed into a stage train those modalities' input layers."""
    from types import SimpleNamespace

    from mil_plugins.engine.trainable import group_names
    from mil_plugins.methods.joint import Joint
    from mil_plugins.methods.replay import Replay

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.connector = torch.nn.Module()
            self.connector.shared = torch.nn.Linear(2, 2)
            self.connector.input_layers = torch.nn.ModuleDict(
                {m: torch.nn.Linear(2, 2) for m in ("image", "audio")})

    model = Model()
    sample = lambda m, i: SimpleNamespace(id=f"{m}{i}", media={m: ["f"]})  # noqa: E731
    stages = [SimpleNamespace(index=0, name="image", modality="image", config={"trainable": None},
                              train_samples=[sample("image", i) for i in range(10)]),
              SimpleNamespace(index=1, name="audio", modality="audio", config={"trainable": None},
                              train_samples=[sample("audio", i) for i in range(10)])]
    ctx = SimpleNamespace(model=model, stages=stages, recipe={"train": {"trainable": ["connector"]}},
                          resolve_groups=lambda groups, m: group_names(model, groups, m),
                          seed=0, stage=stages[1],
                          generator=lambda *salt: torch.Generator().manual_seed(0))
    own = group_names(model, ["connector"], "audio")
    assert not any("input_layers.image" in n for n in own)
    joined = Joint().trainable(ctx, stages[1], set(own))
    assert {"connector.input_layers.image.weight", "connector.input_layers.audio.weight"} <= joined
    replay = Replay(ratio=0.2)
    ctx.stage = stages[0]
    replay.after_stage(ctx, stages[0])
    ctx.stage = stages[1]
    assert "connector.input_layers.image.weight" in replay.trainable(ctx, stages[1], set(own))


# ==================================================================================================
# ewc: the Fisher against a hand computation
# ==================================================================================================
class _TableLM(torch.nn.Module):
    """logits[b, t] = W[input_ids[b, t]]: d(-log softmax(W[x])[y]) / dW[x] = softmax(W[x]) - e_y."""

    def __init__(self, vocab=5):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))
        self.forwards = 0

    def forward(self, batch):
        from types import SimpleNamespace

        self.forwards += 1
        return SimpleNamespace(logits=self.W[batch["input_ids"]], loss=None)


def _hand_fisher(W, samples):
    fisher = torch.zeros_like(W)
    for ids, labels in samples:
        g = torch.zeros_like(W)
        for t in range(len(ids) - 1):
            y = labels[t + 1]
            if y == -100:
                continue
            p = torch.softmax(W[ids[t]], dim=-1)
            p[y] -= 1.0
            g[ids[t]] += p  # summed over the sample's answer tokens
        fisher += g ** 2
    return fisher / len(samples)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_ewc_fisher_is_per_sample_on_summed_answer_loglik(batch_size):
    """A short and a long answer: the Fisher is the mean over samples of (grad of the summed
    log-likelihood)^2, computed by hand, whatever the forward batch size; the pass goes through
    the methods' before_forward (ctx.forward)."""
    model = _TableLM()
    data = [([0, 1, 2, 3], [-100, -100, 2, 3]), ([4, 0, 0, 0], [-100, -100, -100, 1]),
            ([1, 1, 3, 4], [-100, 1, 3, 4])]
    routed = []

    def make_loader(samples, mode="eval", batch_size=16):
        for start in range(0, len(samples), batch_size):
            part = samples[start:start + batch_size]
            yield {"input_ids": torch.tensor([data[s.index][0] for s in part]),
                   "labels": torch.tensor([data[s.index][1] for s in part])}

    stage = Stage(0, "s0", None, train_samples=_samples(None, 3, "f"))
    ctx = MethodContext(model=model, recipe={}, stages=[stage], dist=Dist(), output_dir=Path("."),
                        seed=0, stage=stage, make_loader=make_loader,
                        before_forward=lambda batch: routed.append(len(batch["input_ids"])))
    ewc = EWC(fisher_samples=None, fisher_batch_size=batch_size)
    fisher = ewc._fisher(ctx, stage, {"W": model.W})["W"]
    expected = _hand_fisher(model.W.detach(), [data[s.index] for s in stage.train_samples])
    assert torch.allclose(fisher, expected, atol=1e-6)
    assert sum(routed) == 3 and model.forwards == len(routed)
    # the token-mean gradient (the old estimate) gives a different Fisher: short answers weighed more
    mean_fisher = torch.zeros_like(fisher)
    for ids, labels in data:
        out = model({"input_ids": torch.tensor([ids])}).logits
        loss = torch.nn.functional.cross_entropy(out[0, :-1], torch.tensor(labels[1:]), ignore_index=-100)
        (g,) = torch.autograd.grad(loss, [model.W])
        mean_fisher += g ** 2 / 3
    assert not torch.allclose(mean_fisher, expected, atol=1e-4)


def test_ewc_offload_keeps_importance_in_cpu_memory(tmp_path):
    h = Harness([EWC(fisher_samples=2, offload=True)])
    ewc = h.methods[0]
    h.run_stage(h.stages[0], steps=1)
    pen = ewc.penalties[0]
    assert all(t.device.type == "cpu" for t in [*pen["fisher"].values(), *pen["anchor"].values()])
    h.begin(h.stages[1])
    batch = h.collate(h.stages[1].train_samples[:2])
    terms = ewc.loss_terms(h.ctx, batch, None)
    plain = EWC(fisher_samples=2)
    plain.load_state_dict(checkpoint_roundtrip({"ewc": ewc.state_dict()}, tmp_path)["ewc"])
    assert float(plain.loss_terms(h.ctx, batch, None)["penalty"]) == pytest.approx(
        float(terms["penalty"]), abs=1e-12)

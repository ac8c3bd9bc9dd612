"""HF-style training settings beside ours: TrainingArguments names, every transformers scheduler,
per-device batches, gradient checkpointing, an HF-Trainer ZeRO JSON with "auto" values, --deepspeed
and --local_rank, report_to."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mil_plugins.engine.distributed import (fill_deepspeed_config, global_batch_size,
                                            resolve_deepspeed_config)
from mil_plugins.optim import make_scheduler
from mil_plugins.recipe import RecipeError, load_recipe
from mil_plugins.recipe import schema as S
from mil_plugins.recipe.hf_names import ALIASES, HF_SAME_NAME

ROOT = Path(__file__).resolve().parents[1]
BASE = """
model: {llm: {config: {model_type: llama}}, tokenizer: {build_from_data: true}}
modalities: {image: {}}
data: {root: data}
stages: [{name: image, modality: image, train: image/train.json, test: image/test.json}]
output: {dir: out}
"""

#: the arguments the schedulers that need some are given here
SCHEDULER_KWARGS = {"cosine_with_min_lr": {"min_lr": 0.1}, "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
                    "warmup_stable_decay": {"num_decay_steps": 4}, "cosine_with_restarts": {"num_cycles": 2}}


def recipe(tmp_path, text: str = "", *overrides: str) -> dict:
    path = tmp_path / "r.yaml"
    path.write_text(BASE + text)
    return load_recipe(path, list(overrides))


def test_scheduler_choices_are_every_transformers_scheduler():
    from transformers import SchedulerType

    assert set(S.SCHEDULERS) == {t.value for t in SchedulerType}


@pytest.mark.parametrize("kind", S.SCHEDULERS)
def test_every_scheduler_type_builds_from_a_recipe_and_steps(tmp_path, kind):
    kwargs = json.dumps(SCHEDULER_KWARGS.get(kind, {}))
    train = recipe(tmp_path, "", f"train.lr_scheduler_type={kind}", "train.warmup_steps=2",
                   f"train.lr_scheduler_kwargs={kwargs}")["train"]
    assert train["scheduler"] == kind
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, train, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(0.0 <= lr <= 1.0 for lr in lrs)
    if kind in ("linear", "cosine", "polynomial", "constant_with_warmup"):
        assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])          # warmup_steps=2, from 0 as HF
    if kind in ("reduce_lr_on_plateau", "greedy", "constant"):
        assert lrs == [1.0] * 10                                   # stepped by metrics only / constant
    sched.load_state_dict(sched.state_dict())                      # resumable


def test_a_scheduler_missing_its_arguments_is_refused_when_the_recipe_is_read(tmp_path):
    with pytest.raises(RecipeError, match="lr_scheduler_kwargs.*min_lr"):
        recipe(tmp_path, "", "train.lr_scheduler_type=cosine_with_min_lr")
    with pytest.raises(RecipeError, match="not one of"):
        recipe(tmp_path, "", "train.lr_scheduler_type=cosine_wiggle")


def test_hf_names_are_accepted_in_files_and_overrides(tmp_path):
    r = recipe(tmp_path, "train: {gradient_accumulation_steps: 4, learning_rate: 1.0e-3, "
                         "num_train_epochs: 2, logging_steps: 3, save_steps: 5, lr_scheduler_type: linear, "
                         "report_to: none, per_device_train_batch_size: 2, warmup_steps: 1, "
                         "gradient_checkpointing: true, dataloader_num_workers: 2}\n")
    t = r["train"]
    assert (t["grad_accum"], t["lr"], t["epochs"], t["log_every_steps"], t["save_every_steps"],
            t["scheduler"]) == (4, 1e-3, 2, 3, 5, "linear")
    assert (t["per_device_train_batch_size"], t["warmup_steps"], t["gradient_checkpointing"],
            t["dataloader_num_workers"]) == (2, 1, True, 2)
    assert r["output"]["report_to"] == []
    assert not any(name in t for (_, name) in ALIASES)             # only our names remain
    o = recipe(tmp_path, "", "train.gradient_accumulation_steps=3", "train.report_to=tensorboard")
    assert o["train"]["grad_accum"] == 3 and o["output"]["report_to"] == ["tensorboard"]
    whole = recipe(tmp_path, "", "train={gradient_accumulation_steps: 6, learning_rate: 0.1}")["train"]
    assert (whole["grad_accum"], whole["lr"]) == (6, 0.1)
    # an override in HF's name wins over our name in the file, like any override
    assert recipe(tmp_path, "train: {grad_accum: 2}\n", "train.gradient_accumulation_steps=5"
                  )["train"]["grad_accum"] == 5


def test_both_names_of_one_setting_in_one_file_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="gradient_accumulation_steps is HF's name for train.grad_accum"):
        recipe(tmp_path, "train: {grad_accum: 2, gradient_accumulation_steps: 4}\n")


def test_extends_mixes_hf_and_our_names(tmp_path):
    (tmp_path / "parent.yaml").write_text(BASE + "train: {grad_accum: 2, lr: 0.5}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\ntrain: {gradient_accumulation_steps: 8}\n")
    t = load_recipe(child)["train"]
    assert (t["grad_accum"], t["lr"]) == (8, 0.5)


def test_report_to(tmp_path, monkeypatch):
    assert recipe(tmp_path, "", "output.report_to=[tensorboard]")["output"]["report_to"] == ["tensorboard"]
    with pytest.raises(RecipeError, match="not one of"):
        recipe(tmp_path, "", "output.report_to=[comet]")
    monkeypatch.setitem(sys.modules, "wandb", None)                # not installed
    with pytest.raises(RecipeError, match="wandb package is not installed"):
        recipe(tmp_path, "", "train.report_to=wandb")
    assert recipe(tmp_path, "", "output.report_to=all")["output"]["report_to"] == ["tensorboard"]


def test_per_device_batch_decides_the_global_batch():
    train = {"batch_size": 16, "grad_accum": 2, "per_device_train_batch_size": 3}
    assert global_batch_size(train, world_size=4) == 24
    assert global_batch_size({**train, "per_device_train_batch_size": None}, 4) == 16


HF_ZERO3 = {  # as HF's docs and LLaMA-Factory ship it
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto",
                                                      "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                          "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}
TRAIN = {"batch_size": 16, "per_device_train_batch_size": None, "grad_accum": 2, "max_grad_norm": 0.5,
         "precision": "bf16", "lr": 2e-5, "weight_decay": 0.0}


def test_an_hf_trainer_zero3_json_is_taken_as_it_is(tmp_path):
    path = tmp_path / "ds_z3_config.json"
    path.write_text(json.dumps(HF_ZERO3))
    config = fill_deepspeed_config(path, {**TRAIN, "per_device_train_batch_size": 4}, world_size=2,
                                   hidden_size=64)
    assert "auto" not in json.dumps(config)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"], config["gradient_clipping"]) == (16, 4, 2, 0.5)
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    zero = config["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    assert "optimizer" not in config and "scheduler" not in config  # the recipe's are used
    # a value that says something else than the recipe is refused, not ignored
    bad = json.loads(json.dumps(HF_ZERO3))
    bad["optimizer"]["params"]["lr"] = 1e-3
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="optimizer.params.lr"):
        fill_deepspeed_config(path, TRAIN, world_size=2, hidden_size=64)
    bad["optimizer"] = {"type": "Lamb", "params": {}}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="AdamW"):
        fill_deepspeed_config(path, TRAIN, world_size=2, hidden_size=64)


def test_shipped_deepspeed_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = resolve_deepspeed_config("zero3")
    assert shipped.is_file() and shipped.parent.parent.name == "recipe"   # inside the package
    assert resolve_deepspeed_config("recipes/deepspeed/zero3.json") == shipped
    assert resolve_deepspeed_config(None).name == "zero2.json"
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert resolve_deepspeed_config("mine.json") == Path("mine.json")
    with pytest.raises(ValueError, match="shipped: zero0, zero2"):
        resolve_deepspeed_config("zero9")


def test_train_commands_take_the_launchers_local_rank_and_deepspeed():
    from mil_plugins.cli import build_parser
    from mil_plugins.cli.train import parse_args

    args = build_parser().parse_args(["train", "r.yaml", "a.b=1", "--local_rank=0", "--deepspeed",
                                      "ds.json"])
    assert (args.recipe, args.overrides, args.local_rank, args.deepspeed) == (
        "r.yaml", ["a.b=1"], 0, "ds.json")
    args = build_parser().parse_args(["--local_rank=1", "train", "r.yaml"])  # as the launcher runs `mil`
    assert (args.command, args.recipe) == ("train", "r.yaml")
    args = parse_args(["r.yaml", "--local-rank", "1", "x=2", "--deepspeed", "z.json"])
    assert (args.overrides, args.local_rank, args.deepspeed) == (["x=2"], 1, "z.json")


def test_documented_hf_names():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for (section, name), (to_section, to_name) in ALIASES.items():
        assert f"| `{name}` | `{to_section}.{to_name}`" in text, name
    for section, name in HF_SAME_NAME:
        assert f"| `{name}` | `{section}.{name}`" in text, name


def test_gradient_checkpointing_keeps_loss_and_gradients(monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from mil_plugins.engine.activation_checkpointing import enable_gradient_checkpointing
    from mil_plugins.model.build import build_tiny_llm_config

    def run(checkpointing: bool):
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(**build_tiny_llm_config(50, hidden_size=32, heads=2))
        llm = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        if checkpointing:
            enable_gradient_checkpointing(SimpleNamespace(base_llm=llm.get_base_model))
            assert llm.get_base_model().is_activation_checkpointing
        llm.train()
        ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            embeds = llm.get_input_embeddings()(ids)              # inputs without grad, the hard case
        loss = llm(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in llm.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    loss0, grads0 = run(False)
    loss1, grads1 = run(True)
    assert torch.allclose(loss0, loss1)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], atol=1e-6), name


class _PidDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"index": i, "pid": os.getpid(), "threads": torch.get_num_threads()}


def _collate(items):
    return {"index": [x["index"] for x in items], "pid": {x["pid"] for x in items},
            "threads": {x["threads"] for x in items}}


@pytest.mark.parametrize("workers", [0, 2])
def test_micro_batches_come_in_order_from_dataloader_workers(workers):
    from mil_plugins.engine.batches import micro_batch_stream

    lists = [[3, 1], [0], [9, 8, 7], [2, 2]]
    got = list(micro_batch_stream(_PidDataset(), _collate, lists, num_workers=workers))
    assert [b["index"] for b in got] == lists
    pids = set().union(*(b["pid"] for b in got))
    if workers:
        assert os.getpid() not in pids and len(pids) == 2          # read in two worker processes
        assert set().union(*(b["threads"] for b in got)) == {1}
    else:
        assert pids == {os.getpid()}


def test_on_gpu_a_dataloader_worker_hands_inputs_to_the_step(monkeypatch):
    """A forked worker cannot run a CUDA encoder: it preprocesses, the step encodes on the GPU."""
    from mil_plugins.engine import session as S

    session = SimpleNamespace(
        plugins={"image": SimpleNamespace(preprocess=lambda path: torch.ones(3))},
        model=SimpleNamespace(is_trainable_encoder=lambda m: False),
        recipe={"train": {"feature_cache": True}}, dist=SimpleNamespace(device=torch.device("cuda")))
    monkeypatch.setattr(S, "_in_dataloader_worker", lambda: True)
    kind, tensor = S.Session._media_loader(session, "image", Path("x.png"))
    assert kind == "input" and torch.equal(tensor, torch.ones(3))

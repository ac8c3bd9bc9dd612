"""Run a recipe: build everything from it, train stage after stage, evaluate, report.

``deepspeed tools/train.py RECIPE [key=value ...]``, ``python tools/train.py RECIPE ...`` and
``mil train RECIPE ...`` all end here (:func:`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mil_plugins.atomic import atomic_write_json
from mil_plugins.engine import checkpoint as ckpt
from mil_plugins.engine.context import MethodContext, Stage, lazy_frozen_copy
from mil_plugins.engine.distributed import Dist, fill_deepspeed_config, init_distributed
from mil_plugins.engine.loop import StagePlan, train_stage
from mil_plugins.engine.trainable import apply_trainable, group_names
from mil_plugins.evaluate import predict, score_predictions
from mil_plugins.recipe import load_recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class JsonlLogger:
    """Training logs as JSONL (and TensorBoard scalars when enabled), written by rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = out / "logs" / "train.jsonl"
        self.writer = None
        self.step = 0
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self.step += 1
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step"):
                    self.writer.add_scalar(f"{record.get('stage', 'run')}/{key}", value,
                                           record.get("step", self.step))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Session:
    """Everything a recipe builds: plugins, data, tokenizer, model, methods, loaders."""

    def __init__(self, recipe: dict, dist: Dist, tokenizer_dir: Path | None = None,
                 load_data: bool = True):
        from mil_plugins.data import get_template
        from mil_plugins.plugins import METHODS, MODALITIES

        self.recipe, self.dist = recipe, dist
        self.out = Path(recipe["output"]["dir"])
        self.root = Path(recipe["data"]["root"])
        self.seed = recipe["train"]["seed"]
        self.template = get_template(recipe["model"]["template"])
        self.plugins = {name: MODALITIES.get(name)(**(opts or {}))
                        for name, opts in recipe["modalities"].items()}
        self.skipped: list[dict] = []
        self.stages = [Stage(i, s["name"], s["modality"], config=s)
                       for i, s in enumerate(recipe["stages"])]
        self.warmup_samples: list = []
        if load_data:
            self._load_data()
        self.tokenizer = self._tokenizer(tokenizer_dir)
        seed_everything(self.seed)
        self.model = self._build_model()
        self.model.to(dist.device)
        # the model's plugin objects preprocess the data (an adopted tower brings its own image one)
        self.plugins = dict(self.model.plugins)
        self.base_names = {n for n, _ in self.model.named_parameters()}
        self.methods = [METHODS.get(m["name"])(**m["options"]) for m in recipe["methods"]]
        self.ctx = MethodContext(model=self.model, recipe=recipe, stages=self.stages, dist=dist,
                                 output_dir=self.out, seed=self.seed, make_loader=self.make_loader)
        seed_everything(self.seed + 1)
        for method in self.methods:
            method.setup(self.ctx)
        self.model.to(dist.device)
        self._features: dict[tuple[str, str], torch.Tensor] = {}
        self._cache = None
        if recipe["train"]["feature_cache"]:
            from mil_plugins.cache import FeatureCache
            self._cache = FeatureCache(self.out / "feature-cache")
        self._fingerprints: dict[str, str] = {}

    def _build_model(self):
        """From config / a pretrained LM (``build_model``), or adopted from a Llava checkpoint."""
        from mil_plugins.model.build import build_model, resolve_dtype

        m = self.recipe["model"]
        conn = dict(m["connector"])
        if m["llm"]["llava"]:
            from mil_plugins.model.hf_llava import build_from_llava

            if conn["mode"] != "per_modality":
                raise ValueError("model.llm.llava: an adopted Llava keeps its own image projector; "
                                 "set model.connector.mode: per_modality")
            return build_from_llava(m["llm"]["llava"], self.tokenizer, self.recipe["modalities"],
                                    projector_type=conn["projector_type"],
                                    projector_types=conn["projector_types"], lora=m["lora"],
                                    dtype=resolve_dtype(m["dtype"]))
        if conn.get("shared_dim") is None:
            conn.pop("shared_dim", None)
        llm = {k: v for k, v in m["llm"].items() if v is not None and k != "llava"}
        return build_model({"llm": llm, "dtype": m["dtype"], "modalities": self.recipe["modalities"],
                            "connector": conn, "lora": m["lora"]}, self.tokenizer)

    # ---- data ---------------------------------------------------------------------------------

    def load_samples(self, manifest: str | Path, root: Path | None = None,
                     limit: int | None = None) -> list:
        from mil_plugins.data import load_manifest

        root = root or self.root
        path = Path(manifest)
        if not path.is_absolute():
            path = root / path
        data = load_manifest(path, root, self.plugins, on_error=self.recipe["data"]["on_error"])
        for s in data.skipped:
            self.skipped.append({"manifest": str(path), "id": s.id, "file": str(s.file or ""),
                                 "reason": s.reason})
        samples = list(data.samples)
        return samples[:limit] if limit else samples

    def _load_data(self) -> None:
        data = self.recipe["data"]
        self.warmup_samples = []
        if self.recipe["warmup"]:
            self.warmup_samples = self.load_samples(self.recipe["warmup"]["train"],
                                                    limit=data["max_train_samples"])
        for stage in self.stages:
            stage.train_samples = self.load_samples(stage.config["train"],
                                                    limit=data["max_train_samples"])
            if stage.config["test"]:
                stage.test_samples = self.load_samples(stage.config["test"],
                                                       limit=data["max_test_samples"])

    def _tokenizer(self, tokenizer_dir: Path | None):
        from transformers import AutoTokenizer

        placeholders = [p.placeholder for p in self.plugins.values()]
        if tokenizer_dir is not None:
            return AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok_cfg = self.recipe["model"]["tokenizer"]
        if tok_cfg["build_from_data"]:
            from mil_plugins.data import build_word_tokenizer

            texts = [self.template.literal_text]
            for samples in [self.warmup_samples] + [s.train_samples + s.test_samples
                                                    for s in self.stages]:
                texts.extend(self.template.text(s.conversations, placeholders) for s in samples)
            return build_word_tokenizer(texts, special_tokens=placeholders)
        llm = self.recipe["model"]["llm"]
        source = tok_cfg["pretrained"] or llm["pretrained"] or llm["llava"]
        return AutoTokenizer.from_pretrained(source)

    def _media_loader(self, modality: str, path: Path):
        plugin = self.plugins[modality]
        if self.model.is_trainable_encoder(modality) or not self.recipe["train"]["feature_cache"]:
            return "input", plugin.preprocess(path)
        key = (modality, str(path))
        if key not in self._features:
            from mil_plugins.cache import cached_encode, encoder_fingerprint

            encoder = self.model.encoders[modality]
            if modality not in self._fingerprints:
                self._fingerprints[modality] = encoder_fingerprint(encoder)
            self._features[key] = cached_encode(self._cache, plugin, encoder, path,
                                                self._fingerprints[modality]).cpu()
        return "features", self._features[key]

    def dataset(self, samples: list, mode: str):
        from mil_plugins.data import MultimodalDataset

        return MultimodalDataset(samples, self.tokenizer, self.template, self.plugins,
                                 self.model.placeholders(), self.recipe["model"]["max_length"],
                                 mode=mode, media_loader=self._media_loader)

    def collator(self, mode: str):
        from mil_plugins.data import Collator

        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return Collator(pad, self.plugins, padding_side="right" if mode == "train" else "left")

    def make_loader(self, samples: list, mode: str = "eval", batch_size: int = 16):
        """Batches of ``samples`` in order (evaluation, teacher passes, pseudo-target generation)."""
        dataset, collate = self.dataset(samples, mode), self.collator(mode)
        from mil_plugins.engine.loop import to_device

        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            yield to_device(collate(items), self.dist.device)

    # ---- state --------------------------------------------------------------------------------
    def trained_weights(self, ever_trained: set[str]) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: every parameter trained so far, and every parameter or
        buffer that methods added to the model."""
        out = {}
        for name, param in self.model.named_parameters():
            if name in ever_trained or name not in self.base_names:
                out[name] = param
        return out

    def method_states(self) -> dict[str, Any]:
        return {m.name: m.state_dict() for m in self.methods}

    def restore(self, loaded: dict) -> None:
        """Methods first (they may re-create modules they added), then the weights on top."""
        for method in self.methods:
            method.load_state_dict(loaded["methods"].get(method.name, {}))
        self.model.to(self.dist.device)
        params = dict(self.model.named_parameters())
        missing = [k for k in loaded["weights"] if k not in params]
        if missing:
            raise KeyError(f"checkpoint weights not in the rebuilt model: {missing[:5]} "
                           f"(was the recipe or a method changed?)")
        with torch.no_grad():
            for key, value in loaded["weights"].items():
                params[key].copy_(value.to(params[key].dtype))


def _stage_lr(stage_cfg: dict, train: dict, key: str):
    return stage_cfg.get(key) if stage_cfg.get(key) is not None else train[key]


class Runner:
    """Stage after stage: train, evaluate every seen stage, checkpoint, report."""

    def __init__(self, recipe: dict, resume: bool = False):
        self.recipe = recipe
        self.dist = init_distributed()
        self.out = Path(recipe["output"]["dir"])
        self.ckpt_root = self.out / "checkpoints"
        self._prepare_data()
        self.session = Session(recipe, self.dist)
        self.ctx, self.methods, self.model = self.session.ctx, self.session.methods, self.session.model
        self.logger = JsonlLogger(self.out, self.dist.is_main, recipe["output"]["tensorboard"])
        stages = recipe["stages"]
        self.state: dict[str, Any] = {
            "completed": 0, "warmup_done": False, "in_stage": None, "step": 0,
            "stages": [s["name"] for s in stages],
            "modalities": [s["modality"] or "text" for s in stages],
            "accuracy_matrix": [[None] * len(stages) for _ in stages],
            "baseline": None, "per_task": {}, "trainable_parameters": [None] * len(stages),
            "seconds": [None] * len(stages), "ever_trained": [],
        }
        self.resume_optimizer = None
        if resume:
            self._resume()

    def _prepare_data(self) -> None:
        gen = self.recipe["data"]["generate"]
        if gen is not None:
            if self.dist.is_main:
                from mil_plugins.benchmark import make_benchmark
                make_benchmark(Path(self.recipe["data"]["root"]), size=gen["size"], seed=gen["seed"])
            self.dist.barrier()

    # ---- resume -------------------------------------------------------------------------------
    def _resume(self) -> None:
        last = self.ckpt_root / "last"
        if not (last / "state.json").exists():
            if self.dist.is_main:
                print(f"[mil] --resume: no checkpoint in {last}; starting from the beginning")
            return
        loaded = ckpt.read_checkpoint(last)
        self.session.restore(loaded)
        self.state = loaded["state"]
        self.resume_optimizer = loaded["optimizer"]
        if self.dist.is_main:
            where = (f"stage {self.state['in_stage']} step {self.state['step']}"
                     if self.state["in_stage"] is not None else
                     f"after {self.state['completed']} stage(s)")
            print(f"[mil] resuming from {last} ({where})")

    def _save(self, path: Path, optimizer_state: dict | None = None) -> None:
        if not self.dist.is_main:
            return
        ckpt.write_checkpoint(path, weights=self.session.trained_weights(set(self.state["ever_trained"])),
                              methods=self.session.method_states(), state=self.state,
                              recipe=self.recipe, tokenizer=self.session.tokenizer,
                              optimizer_state=optimizer_state)

    # ---- training -----------------------------------------------------------------------------
    def _ds_config(self) -> dict | None:
        if not self.dist.deepspeed:
            return None
        repo = Path(__file__).resolve().parents[2]
        path = Path(self.recipe["train"]["deepspeed"] or "recipes/deepspeed/zero2.json")
        if not path.is_absolute() and not path.exists() and (repo / path).exists():
            path = repo / path  # the shipped ZeRO configs, whatever the working directory
        return fill_deepspeed_config(path, self.recipe["train"], self.dist.world_size)

    def _train(self, plan: StagePlan, names: set[str], stage: Stage | None) -> dict:
        count = apply_trainable(self.model, names)
        self.state["ever_trained"] = sorted(set(self.state["ever_trained"]) | names)
        dataset = self.session.dataset(plan.samples, "train")
        collate = self.session.collator("train")
        start, opt_state = 0, None
        if self.state["in_stage"] == plan.key and self.resume_optimizer is not None:
            start, opt_state = self.state["step"], self.resume_optimizer
        self.resume_optimizer = None

        def on_checkpoint(step, optimizer, scheduler):
            if self.dist.deepspeed:
                return  # ZeRO partitions the optimiser: resume restarts the stage instead
            self.state.update(in_stage=plan.key, step=step)
            self._save(self.ckpt_root / "last", {"optimizer": optimizer.state_dict(),
                                                 "scheduler": scheduler.state_dict()})

        result = train_stage(ctx=self.ctx, plan=plan, methods=self.methods, dataset=dataset,
                             collate=collate, train_cfg=self.recipe["train"], dist=self.dist,
                             ds_config=self._ds_config(), logger=self.logger, start_step=start,
                             optimizer_state=opt_state, on_checkpoint=on_checkpoint)
        self.state.update(in_stage=None, step=0)
        result["trainable_parameters"] = count
        return result

    def _warmup(self) -> None:
        w = self.recipe["warmup"]
        if not w or self.state["warmup_done"]:
            return
        train = self.recipe["train"]
        plan = StagePlan("warmup", -1, self.session.warmup_samples, w["epochs"], w["max_steps"],
                         w["lr"] if w["lr"] is not None else train["lr"], None)
        names = group_names(self.model, w["trainable"], None)
        self._train(plan, names, None)
        self.state["warmup_done"] = True
        self._save(self.ckpt_root / "warmup")
        if self.dist.is_main:
            ckpt.update_last(self.ckpt_root, self.ckpt_root / "warmup")

    def _evaluate(self, stage: Stage) -> dict:
        ev = self.recipe["eval"]
        rows = predict(self.model, stage.test_samples, self.session.make_loader,
                       methods=self.methods, ctx=self.ctx, dist=self.dist,
                       batch_size=ev["batch_size"], max_new_tokens=ev["max_new_tokens"],
                       desc=f"eval {stage.name}")
        return score_predictions(rows)

    def _baseline(self) -> None:
        if not self.recipe["eval"]["baseline"] or self.state["baseline"] is not None:
            return
        baseline = []
        for stage in self.session.stages:
            self.ctx.stage = stage
            baseline.append(self._evaluate(stage)["score"] if stage.test_samples else None)
        self.state["baseline"] = baseline
        self.ctx.stage = None

    def run(self) -> dict:
        train = self.recipe["train"]
        self._warmup()
        self._baseline()
        stages = self.session.stages
        self.ctx.seen = stages[: self.state["completed"]]
        for stage in stages[self.state["completed"]:]:
            cfg = stage.config
            self.ctx.stage = stage
            for method in self.methods:
                method.before_stage(self.ctx, stage)
            # after before_stage, so modules a method just added (zero-initialised) exist in it too
            self.ctx._teacher = lazy_frozen_copy(self.model)
            samples = list(stage.train_samples)
            for method in self.methods:
                samples = method.train_samples(self.ctx, stage, samples)
            names = group_names(self.model, cfg["trainable"] or train["trainable"], stage.modality)
            for method in self.methods:
                names = set(method.trainable(self.ctx, stage, set(names)))
            plan = StagePlan(stage.name, stage.index, samples,
                             cfg["epochs"] if cfg["epochs"] is not None else train["epochs"],
                             cfg["max_steps"] if cfg["max_steps"] is not None else train["max_steps"],
                             _stage_lr(cfg, train, "lr"), _stage_lr(cfg, train, "mm_projector_lr"))
            result = self._train(plan, names, stage)
            for method in self.methods:
                method.after_stage(self.ctx, stage)
            self.ctx._teacher = None
            self.ctx.seen = stages[: stage.index + 1]
            i = stage.index
            evaluated = stages[: i + 1] + (stages[i + 1:] if self.recipe["eval"]["unseen"] else [])
            for other in evaluated:
                if other.test_samples:
                    self.ctx.stage = other
                    scored = self._evaluate(other)
                    self.state["accuracy_matrix"][i][other.index] = scored["score"]
                    self.state["per_task"].setdefault(stage.name, {})[other.name] = scored["tasks"]
            self.ctx.stage = stage
            self.state["trainable_parameters"][i] = result["trainable_parameters"]
            self.state["seconds"][i] = result["seconds"]
            self.state["completed"] = i + 1
            self.logger.log({"stage": stage.name, "event": "evaluated",
                             "scores": self.state["accuracy_matrix"][i]})
            path = ckpt.stage_dir(self.ckpt_root, i, stage.name)
            self._save(path)
            if self.dist.is_main:
                ckpt.update_last(self.ckpt_root, path)
                self._write_report()
            self.dist.barrier()
        self.logger.close()
        return self._write_report() if self.dist.is_main else {}

    def _write_report(self) -> dict:
        from mil_plugins.report import write_report

        done = self.state["completed"]
        s = self.state
        result = {
            "stages": s["stages"], "modalities": s["modalities"],
            "accuracy_matrix": s["accuracy_matrix"][:done] if done else [],
            "trainable_parameters": s["trainable_parameters"][:done],
            "seconds": s["seconds"][:done],
            "method": "+".join(m["name"] for m in self.recipe["methods"]),
            "recipe": self.recipe.get("_source", ""),
            "per_task": s["per_task"].get(s["stages"][done - 1], {}) if done else {},
            "skipped_samples": self.session.skipped,
            "completed_stages": done, "world_size": self.dist.world_size,
        }
        if s["baseline"] is not None:
            result["baseline"] = s["baseline"]
        write_report(self.out, result)
        return json.loads((self.out / "metrics.json").read_text())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description="Run a mil-plugins recipe.")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; ignored otherwise")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    threads = os.environ.get("MIL_NUM_THREADS") or recipe["train"]["num_threads"]
    if threads:
        torch.set_num_threads(int(threads))
    runner = Runner(recipe, resume=args.resume)
    metrics = runner.run()
    if runner.dist.is_main:
        out = Path(recipe["output"]["dir"])
        print(f"[mil] done: {out / 'report.md'}")
        if metrics:
            print(f"[mil] final average accuracy {metrics.get('final_average_accuracy')}, "
                  f"forgetting {metrics.get('forgetting')}")
    return 0


class EvalSession:
    """A stage checkpoint rebuilt for scoring (``mil eval``) or export."""

    def __init__(self, checkpoint: Path):
        loaded = ckpt.read_checkpoint(checkpoint)
        self.recipe = loaded["recipe"]
        self.dist = Dist()
        self.session = Session(self.recipe, self.dist, tokenizer_dir=loaded["tokenizer_dir"],
                               load_data=False)
        self.session.restore(loaded)
        self.model, self.methods, self.ctx = self.session.model, self.session.methods, self.session.ctx
        self.model.eval()
        self.make_loader = self.session.make_loader
        self.state = loaded["state"]

    def load_samples(self, manifest: Path, root: Path | None = None) -> list:
        return self.session.load_samples(manifest, root)


def load_for_eval(checkpoint: Path) -> EvalSession:
    return EvalSession(Path(checkpoint))

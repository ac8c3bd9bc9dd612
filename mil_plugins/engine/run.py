"""Run a recipe: build everything from it, train stage after stage, evaluate, report.

``deepspeed tools/train.py RECIPE [key=value ...]``, ``python tools/train.py RECIPE ...`` and
``mil train RECIPE ...`` all end here (:class:`Runner`), through :func:`mil_plugins.cli.train.main`,
which parses the command line and prints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mil_plugins.engine import checkpoint as ckpt
from mil_plugins.engine.distributed import (fill_deepspeed_config, init_distributed,
                                            resolve_deepspeed_config)
from mil_plugins.engine.logs import JsonlLogger, report_targets
from mil_plugins.engine.loop import StagePlan, train_stage
from mil_plugins.engine.preflight import preflight
from mil_plugins.engine.resume import check_resume, data_fingerprint
from mil_plugins.engine.rundir import RunFolder
from mil_plugins.engine.session import Session
from mil_plugins.engine.steps import evaluate_samples, prepare_data, stage_plan
from mil_plugins.engine.trainable import apply_trainable, group_names
from mil_plugins.methods.context import Stage
from mil_plugins.methods.teacher import TeacherSource


#: where a mid-stage checkpoint keeps the teacher's stage-start weights (beside the methods' states)
TEACHER_KEY = "_teacher"


class Runner:
    """Stage after stage: train, evaluate every seen stage, checkpoint, report."""

    def __init__(self, recipe: dict, resume: bool = False, overwrite: bool = False,
                 allow_changes: list[str] | tuple[str, ...] = ()):
        self.recipe = recipe
        self.dist = init_distributed()
        self.out = Path(recipe["output"]["dir"])
        self.ckpt_root = self.out / "checkpoints"
        self.folder = RunFolder(self.out)
        with self.folder.claim(resume=resume, overwrite=overwrite, main=self.dist.is_main):
            self._setup(resume, allow_changes)

    def _setup(self, resume: bool, allow_changes) -> None:
        recipe = self.recipe
        self.dist.barrier()
        self._prepare_data()
        self.data_fingerprint = data_fingerprint(recipe)
        loaded = self._read_resume_checkpoint(allow_changes) if resume else None
        if self.dist.is_main:
            preflight(recipe)  # data.preflight: full | manifests | off
        self.dist.barrier()
        self.session = Session(recipe, self.dist,
                               tokenizer_dir=loaded["tokenizer_dir"] if loaded else None)
        self.ctx, self.methods, self.model = self.session.ctx, self.session.methods, self.session.model
        self.hooks = self.session.hooks
        self.logger = JsonlLogger(self.out, self.dist.is_main, report_targets(recipe["output"]),
                                  run_config={k: v for k, v in recipe.items() if k != "_source"})
        stages = recipe["stages"]
        self.state: dict[str, Any] = {
            "completed": 0, "warmup_done": False, "in_stage": None, "step": 0,
            "stages": [s["name"] for s in stages],
            "modalities": [s["modality"] or "text" for s in stages],
            "accuracy_matrix": [[None] * len(stages) for _ in stages],
            "baseline": None, "per_task": {}, "trainable_parameters": [None] * len(stages),
            "seconds": [None] * len(stages), "ever_trained": [], "deepspeed_tag": None,
        }
        self.resume_optimizer = None
        self.resume_teacher = None  # stage-start weights of a mid-stage checkpoint's teacher
        if loaded is not None:
            self._resume(loaded)

    def _prepare_data(self) -> None:
        prepare_data(self.recipe, self.dist)

    # ---- resume -------------------------------------------------------------------------------
    def _read_resume_checkpoint(self, allow_changes) -> dict | None:
        """The last checkpoint, verified, after checking that the recipe and the data it was
        written with are the ones given now (the tokenizer is then loaded from it)."""
        last = self.ckpt_root / "last"
        if not (last / "state.json").exists():
            if self.dist.is_main:
                print(f"[mil] --resume: no checkpoint in {last}; starting from the beginning")
            return None
        loaded = ckpt.read_checkpoint(last)
        allowed = check_resume(last, loaded["recipe"], self.recipe, loaded["data"],
                               self.data_fingerprint, allow_changes)
        if allowed and self.dist.is_main:
            print(f"[mil] --resume: allowed change(s): {', '.join(allowed)}")
        return loaded

    def _resume(self, loaded: dict) -> None:
        last = self.ckpt_root / "last"
        self.session.restore(loaded)
        self.state = loaded["state"]
        self.resume_optimizer = loaded["optimizer"]
        self.resume_teacher = (loaded["methods"] or {}).get(TEACHER_KEY)
        if self.dist.is_main:
            where = (f"stage {self.state['in_stage']} step {self.state['step']}"
                     if self.state["in_stage"] is not None else
                     f"after {self.state['completed']} stage(s)")
            print(f"[mil] resuming from {last} ({where})")

    def _save(self, path: Path, optimizer_state: dict | None = None) -> None:
        if not self.dist.is_main:
            return
        methods = self.session.method_states()
        source = self.ctx._teacher
        if self.state["in_stage"] is not None and isinstance(source, TeacherSource) and source.sealed:
            methods[TEACHER_KEY] = source.tensors()  # a resumed stage distils the same teacher
        ckpt.write_checkpoint(path, weights=self.session.trained_weights(set(self.state["ever_trained"])),
                              methods=methods, state=self.state,
                              recipe=self.recipe, tokenizer=self.session.tokenizer,
                              optimizer_state=optimizer_state, data=self.data_fingerprint)

    # ---- training -----------------------------------------------------------------------------
    def _ds_config(self) -> dict | None:
        if not self.dist.deepspeed:
            return None
        path = resolve_deepspeed_config(self.recipe["train"]["deepspeed"])  # or a shipped one
        return fill_deepspeed_config(path, self.recipe["train"], self.dist.world_size,
                                     hidden_size=self.model.base_llm().config.hidden_size)

    def _train(self, plan: StagePlan, names: set[str], stage: Stage | None) -> dict:
        count = apply_trainable(self.model, names)
        self.state["ever_trained"] = sorted(set(self.state["ever_trained"]) | names)
        dataset = self.session.dataset(plan.samples, "train")
        collate = self.session.collator("train")
        resuming = self.state["in_stage"] == plan.key
        start = self.state["step"] if resuming else 0
        opt_state = self.resume_optimizer if resuming else None
        ds_tag = self.state.get("deepspeed_tag") if resuming else None
        if resuming and (opt_state is None) == (ds_tag is None):
            raise RuntimeError(
                f"{self.ckpt_root / 'last'} is a mid-stage checkpoint written "
                f"{'with' if ds_tag else 'without'} DeepSpeed: resume it the same way "
                f"({'deepspeed tools/train.py' if ds_tag else 'python tools/train.py'} ... --resume)")
        ds_dir = self.ckpt_root / "deepspeed"
        self.resume_optimizer = None
        if isinstance(self.ctx._teacher, TeacherSource):
            saved = self.resume_teacher if resuming else None
            if resuming and saved is None and self.dist.is_main:
                print(f"[mil] --resume: {self.ckpt_root / 'last'} holds no stage-start teacher "
                      f"weights (written by an older version); the teacher is the resumed model")
            self.ctx._teacher.seal(names, saved=saved)  # before the first step moves the weights
        self.resume_teacher = None

        def on_checkpoint(step, optimizer, scheduler, backend):
            self.state.update(in_stage=plan.key, step=step)
            if self.dist.deepspeed:
                tag = f"{plan.key}-step{step}"
                backend.save(ds_dir, tag)  # collective: every rank writes its partition
                self.dist.barrier()
                self.state["deepspeed_tag"] = tag
                self._save(self.ckpt_root / "last")  # state.json now points at the new tag
                if self.dist.is_main:
                    for old in ds_dir.iterdir():
                        if old.is_dir() and old.name != tag:
                            shutil.rmtree(old, ignore_errors=True)
                self.dist.barrier()
            else:
                self.state["deepspeed_tag"] = None
                self._save(self.ckpt_root / "last", {"optimizer": optimizer.state_dict(),
                                                     "scheduler": scheduler.state_dict()})

        result = train_stage(ctx=self.ctx, plan=plan, methods=self.hooks, dataset=dataset,
                             collate=collate, train_cfg=self.recipe["train"], dist=self.dist,
                             ds_config=self._ds_config(), logger=self.logger, start_step=start,
                             optimizer_state=opt_state,
                             deepspeed_resume=(ds_dir, ds_tag) if ds_tag else None,
                             on_checkpoint=on_checkpoint)
        self.state.update(in_stage=None, step=0, deepspeed_tag=None)
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
        return evaluate_samples(self.session, stage.test_samples, f"eval {stage.name}")

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
            self.session.fit_standardizer(stage)  # before the teacher copy: both see it
            self.hooks.before_stage(stage)
            # after before_stage, so modules a method just added (zero-initialised) exist in it too;
            # only when a method distils from it (finetune & co. keep no copy of the model)
            self.ctx._teacher = TeacherSource(self.model) if self.hooks.uses_teacher else None
            if self.ctx._teacher is not None and self.state["in_stage"] == stage.name \
                    and self.resume_teacher is not None:
                self.ctx._teacher.seal(self.resume_teacher, saved=self.resume_teacher)
            samples = self.hooks.train_samples(stage, list(stage.train_samples))
            names = group_names(self.model, cfg["trainable"] or train["trainable"], stage.modality)
            names = self.hooks.trainable(stage, set(names))
            plan = stage_plan(stage.name, stage.index, samples, cfg, train)
            result = self._train(plan, names, stage)
            self.hooks.after_stage(stage)
            self.ctx._teacher = None
            self.ctx.seen = stages[: stage.index + 1]
            i = stage.index
            evaluated = stages[: i + 1] + (stages[i + 1:] if self.recipe["eval"]["unseen"] else [])
            for other in evaluated:
                if other.test_samples:
                    self.ctx.stage = other
                    scored = self._evaluate(other)
                    self.state["accuracy_matrix"][i][other.index] = scored["score"]
                    self.state.setdefault("accuracy_se", [[None] * len(stages) for _ in stages])
                    self.state["accuracy_se"][i][other.index] = scored["se"]
                    self.state.setdefault("test_samples", {})[other.name] = scored["n"]
                    self.state["per_task"].setdefault(stage.name, {})[other.name] = scored["tasks"]
            self.ctx.stage = stage
            self.state["trainable_parameters"][i] = result["trainable_parameters"]
            self.state["seconds"][i] = result["seconds"]
            self.state["completed"] = i + 1
            row = self.state["accuracy_matrix"][i]
            self.logger.log({"stage": stage.name, "event": "evaluated", "scores": row,
                             "after_stage": i + 1,  # report_to: eval/<stage> over stages trained
                             "eval": {s.name: row[s.index] for s in stages if row[s.index] is not None}})
            path = ckpt.stage_dir(self.ckpt_root, i, stage.name)
            self._save(path)
            if self.dist.is_main:
                ckpt.update_last(self.ckpt_root, path)
                # `last` no longer points into DeepSpeed's mid-stage checkpoints
                shutil.rmtree(self.ckpt_root / "deepspeed", ignore_errors=True)
                self._write_report()
            self.dist.barrier()
        self.logger.close()
        return self._write_report() if self.dist.is_main else {}

    def _write_report(self) -> dict:
        from mil_plugins.machine import describe as describe_machine
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
            "accuracy_se": s.get("accuracy_se", [])[:done],
            "test_samples": s.get("test_samples", {}),
            "completed_stages": done, "world_size": self.dist.world_size,
            "machine": describe_machine(),  # the one that wrote this file (a resumed run: the last)
        }
        if s["baseline"] is not None:
            result["baseline"] = s["baseline"]
        write_report(self.out, result)
        return json.loads((self.out / "metrics.json").read_text())

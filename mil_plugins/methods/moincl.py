"""``moincl``: MoInCL -- pseudo targets, instruction-based distillation and weight fusion.

Pian et al., "Modality-Inconsistent Continual Learning of Multimodal Large Language Models"
(arXiv 2412.13050; code weiguoPian/MICL_TMLR). Stages change task type as well as modality
(the mixed sequence, ``mil make-benchmark --sequence mixed``). Three parts, each off by option:

Pseudo Target Generation (``pseudo``; :mod:`~mil_plugins.methods.pseudo_targets`)
    In ``train_samples``, before the stage trains, when the stage brings a task type that is new
    for a modality an earlier stage trained, the model as it is then (the pre-stage model) writes
    targets of the earlier task type for the stage's own inputs (captions when the new task is QA,
    answers to the earlier questions when it is captioning). At every micro-batch the first
    ``pseudo_num`` of its samples that have pseudo targets are run again as pseudo samples:
    ``pseudo_weight * CE`` on the pseudo targets plus ``kl_weight * T^2 * KL(prev_T || cur_T)``
    between the previous model (``ctx.teacher()``) and the current one over the pseudo samples'
    tokens. The targets are state: a mid-stage ``--resume`` trains on the same ones.
Instruction-based Knowledge Distillation (``ikd_weight``; :mod:`~mil_plugins.methods.text_prompts`)
    At every micro-batch, ``text_samples`` text-only prompts (``text_pool``, default the benchmark's
    text split) through both models: ``ikd_weight * T^2 * KL(prev_T || cur_T)`` over every prompt
    token.
Weight fusion (``fusion_alpha``, ``fuse``)
    After every epoch (hook ``after_epoch``), each fused parameter becomes
    ``(1 - alpha) * theta_old + alpha * theta_new`` with ``theta_old`` its value at the start of the
    stage. ``fuse: llm`` (default) fuses the trainable LLM parameters (the LoRA), as the paper's
    code does; ``trainable`` every trainable parameter; ``none`` nothing.

None of this runs in the first stage or the warm-up (nothing learned yet to keep). ``per_stage``
overrides ``pseudo_num``, ``pseudo_weight``, ``kl_weight``, ``ikd_weight`` and ``fusion_alpha``
for named stages (the paper's code sets them per step). Loss terms: ``pseudo_ce``, ``pseudo_kl``,
``ikd``.
"""

from __future__ import annotations

from typing import Any

import torch

from mil_plugins.methods import pseudo_targets as ptg
from mil_plugins.methods.base import Method
from mil_plugins.methods.lwf import masked_kl
from mil_plugins.methods.text_prompts import TextPromptPool, prompt_kl

FUSE = ("llm", "trainable", "none")
PER_STAGE = ("pseudo_num", "pseudo_weight", "kl_weight", "ikd_weight", "fusion_alpha")


class MoInCL(Method):
    name = "moincl"
    uses_teacher = True
    default_options: dict[str, Any] = {
        "T": 5.0,                # temperature of both KL terms (paper's code: 5)
        # Pseudo Target Generation
        "pseudo": True,
        "pseudo_num": 4,         # pseudo samples per micro-batch (paper's code: 1-4 per step)
        "pseudo_weight": 1.0,    # weight of the pseudo samples' cross-entropy
        "kl_weight": 1.0,        # lambda_kl of their KL to the previous model (paper: 0.1-1.0)
        "task_types": {},        # stage name -> caption | qa | [both] (default: from the metrics)
        "max_new_tokens": None,  # pseudo-target length (null: eval.max_new_tokens)
        "gen_batch_size": None,  # generation batch (null: eval.batch_size)
        # Instruction-based Knowledge Distillation
        "ikd_weight": 1.0,
        "text_pool": None,       # LLaVA-JSON of text-only prompts (null: text/train.json, warm-up)
        "text_samples": 4,       # prompts per micro-batch (paper's code: 4)
        # weight fusion
        "fusion_alpha": 0.5,     # theta = (1 - alpha) theta_old + alpha theta_new; 1.0: off
        "fuse": "llm",           # llm | trainable | none
        "per_stage": {},         # stage name -> {option: value} for the options in PER_STAGE
    }

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if float(o["T"]) <= 0:
            raise ValueError(f"method 'moincl': T must be > 0, got {o['T']!r}")
        if o["fuse"] not in FUSE:
            raise ValueError(f"method 'moincl': fuse must be one of {FUSE}, got {o['fuse']!r}")
        if int(o["text_samples"]) < 1:
            raise ValueError("method 'moincl': text_samples must be >= 1")
        if not isinstance(o["task_types"], dict) or not isinstance(o["per_stage"], dict):
            raise ValueError("method 'moincl': task_types and per_stage map stage names to values")
        for stage, over in o["per_stage"].items():
            bad = sorted(set(over or {}) - set(PER_STAGE))
            if bad:
                raise ValueError(f"method 'moincl': per_stage.{stage} sets {bad}; only "
                                 f"{list(PER_STAGE)} can be set per stage")
        for key in PER_STAGE:
            values = [o[key]] + [v[key] for v in o["per_stage"].values() if key in (v or {})]
            if any(float(v) < 0 for v in values):
                raise ValueError(f"method 'moincl': {key} must be >= 0")
        if any(float(v) > 1 for v in [o["fusion_alpha"]] + [
                v["fusion_alpha"] for v in o["per_stage"].values() if "fusion_alpha" in (v or {})]):
            raise ValueError("method 'moincl': fusion_alpha must be in [0, 1]")
        self.prompts = TextPromptPool("moincl", o["text_pool"])
        self.targets_stage: str | None = None   # the stage the pseudo targets were made for
        self.targets: dict[str, list[list[str]]] = {}  # sample id -> [[task type, prompt, answer]]
        self.dropped = 0                        # empty generations left out
        self._samples: dict[str, Any] = {}      # sample id -> Sample of the current stage
        self._step = 0
        self._micro = 0

    def option(self, stage, key: str):
        over = (self.options["per_stage"] or {}).get(getattr(stage, "name", None)) or {}
        return over.get(key, self.options[key])

    @staticmethod
    def _active(ctx) -> bool:
        return bool(ctx.seen) and ctx.stage is not None and ctx.stage.index >= 0

    # ---- hooks -------------------------------------------------------------------------------
    def setup(self, ctx):
        fusing = self.options["fuse"] != "none" and (
            float(self.options["fusion_alpha"]) < 1
            or any(float(v.get("fusion_alpha", 1)) < 1 for v in self.options["per_stage"].values()))
        if fusing and getattr(ctx.dist, "deepspeed", False):
            raise ValueError("method 'moincl': weight fusion edits the module's weights, which "
                             "DeepSpeed's optimiser keeps its own copy of; run it without DeepSpeed "
                             "or set options.fuse: none")

    def train_samples(self, ctx, stage, samples):
        self._samples = {str(s.id): s for s in stage.train_samples}
        if stage.index < 0 or self.targets_stage == stage.name:
            return samples  # warm-up, or a resumed stage: its targets came with the checkpoint
        self.targets_stage, self.targets, self.dropped = stage.name, {}, 0
        if not self.options["pseudo"]:
            return samples
        earlier = ptg.earlier_types(ctx.stages, stage, self.options["task_types"])
        if not earlier:
            return samples
        model = ctx.model  # nothing of this stage is trained yet: the pre-stage model
        placeholder = model.plugins[stage.modality].placeholder
        ev = (ctx.recipe or {}).get("eval") or {}
        max_new = int(self.options["max_new_tokens"] or ev.get("max_new_tokens") or 16)
        batch = int(self.options["gen_batch_size"] or ev.get("batch_size") or 16)
        for kind in sorted(earlier):
            prompts = ptg.pseudo_prompts(ctx, stage, kind, earlier[kind], placeholder)
            queries = [ptg.as_sample(self._samples[sid], p, "?", kind) for sid, p in prompts]
            answers = ptg.generate(ctx, model, queries, batch, max_new)
            for (sid, prompt), answer in zip(prompts, answers):
                if not answer.strip():
                    self.dropped += 1
                    continue
                self.targets.setdefault(sid, []).append([kind, prompt, answer.strip()])
            if getattr(ctx.dist, "is_main", True):
                made = sum(1 for v in self.targets.values() for t in v if t[0] == kind)
                print(f"[mil] moincl: stage {stage.name!r}: {made} pseudo {kind} target(s) from "
                      f"the pre-stage model ({self.dropped} empty left out)")
        return samples

    def loss_terms(self, ctx, batch, outputs):
        if not self._active(ctx):
            return {}
        stage, T = ctx.stage, float(self.options["T"])
        terms = {}
        k = int(self.option(stage, "pseudo_num"))
        if self.targets and k > 0:
            pseudo = self.pseudo_batch(batch.get("ids") or [], k)
            if pseudo:
                pb = next(iter(ctx.make_loader(pseudo, mode="train", batch_size=len(pseudo))))
                out = ctx.forward(pb)
                with torch.no_grad():
                    t_logits = ctx.forward(pb, model=ctx.teacher()).logits
                terms["pseudo_ce"] = float(self.option(stage, "pseudo_weight")) * out.loss
                terms["pseudo_kl"] = float(self.option(stage, "kl_weight")) * masked_kl(
                    out.logits, t_logits, pb["attention_mask"], T)
        w = float(self.option(stage, "ikd_weight"))
        if w > 0:
            text = self.prompts.draw(ctx, self.options["text_samples"], self._step, self._micro)
            terms["ikd"] = w * prompt_kl(ctx, text, T)
        self._micro += 1
        return terms

    def pseudo_batch(self, ids, k: int) -> list:
        """The pseudo samples of the first ``k`` pseudo targets of the batch's samples, in order."""
        out = []
        for sid in ids:
            sample = self._samples.get(str(sid))
            for kind, prompt, answer in self.targets.get(str(sid), []) if sample else []:
                out.append(ptg.as_sample(sample, prompt, answer, kind))
            if len(out) >= k:
                break
        return out[:k]

    def after_step(self, ctx, stage, step):
        self._step, self._micro = int(step), 0

    def after_epoch(self, ctx, stage, epoch):
        if not self._active(ctx) or self.options["fuse"] == "none":
            return
        alpha = float(self.option(stage, "fusion_alpha"))
        if alpha >= 1.0:
            return
        fuse_weights(ctx.model, ctx.teacher(), alpha, llm_only=self.options["fuse"] == "llm")

    def after_stage(self, ctx, stage):
        self._step, self._micro = 0, 0

    def state_dict(self):
        state: dict[str, Any] = {}
        if self.targets_stage is not None:
            state.update(targets_stage=self.targets_stage, dropped=self.dropped,
                         targets={k: [list(t) for t in v] for k, v in self.targets.items()})
        if self._step:
            state["step"] = self._step
        return state

    def load_state_dict(self, state):
        state = state or {}
        self.targets_stage = state.get("targets_stage")
        self.targets = {str(k): [[str(x) for x in t] for t in v]
                        for k, v in (state.get("targets") or {}).items()}
        self.dropped = int(state.get("dropped", 0))
        self._step, self._micro = int(state.get("step", 0)), 0


@torch.no_grad()
def fuse_weights(model: torch.nn.Module, old_model: torch.nn.Module, alpha: float,
                 llm_only: bool = True) -> list[str]:
    """``p <- (1 - alpha) * old + alpha * p`` for every trainable parameter of ``model`` (only
    the LLM's, ``llm.*``, with ``llm_only``), ``old`` the same-named one of ``old_model``;
    returns the names fused."""
    old = dict(old_model.named_parameters())
    fused = []
    for name, p in model.named_parameters():
        if not p.requires_grad or (llm_only and not name.startswith("llm.")):
            continue
        if name not in old:
            raise KeyError(f"method 'moincl': weight fusion: the previous model has no {name!r}")
        prev = old[name].detach().to(device=p.device, dtype=p.dtype)
        if prev.shape != p.shape:
            raise ValueError(f"method 'moincl': weight fusion: {name!r} is {tuple(p.shape)} here "
                             f"but {tuple(prev.shape)} in the previous model (sharded weights?)")
        p.copy_((1.0 - alpha) * prev + alpha * p)
        fused.append(name)
    return fused

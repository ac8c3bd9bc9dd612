"""The one training loop, for a single process and for DeepSpeed alike.

Data order is a pure function of (seed, stage, epoch), the seed being ``train.data_seed`` when set
(HF's name; else ``train.seed``): every epoch is a seeded permutation cut into global batches
(padded by wrapping so that every rank takes the same number of steps); rank ``r`` takes its slice
of each global batch. So a 2-process DeepSpeed run sees the same global batches as a single
process, and a resumed run picks up exactly where the killed one stopped.

The loss of a step is the token mean over the *global* batch: every micro-batch's summed
cross-entropy is divided by the number of answer tokens in the whole global batch (counted on
every rank, summed across ranks), then scaled up by ``world x accum`` to undo the averaging that
gradient accumulation and data-parallel reduction apply. A micro-batch-mean loss averaged over
ranks weighs a short answer on one rank like a long one on another, and 1 process and N ranks then
train different models; with the global normalisation they train the same one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from mil_plugins.engine.batches import micro_batch_stream
from mil_plugins.engine.distributed import global_batch_size
from mil_plugins.optim import make_scheduler, param_groups
from mil_plugins.methods.dispatch import MethodHooks


@dataclass
class StagePlan:
    key: str                       # "warmup" or the stage's name (used in logs and checkpoints)
    index: int                     # -1 for the warm-up
    samples: list
    epochs: float
    max_steps: int | None
    lr: float
    mm_projector_lr: float | None


def epoch_order(n: int, seed: int, stage_index: int, epoch: int, global_batch: int) -> list[list[int]]:
    """The global batches of one epoch: a seeded permutation, padded by wrapping to full batches."""
    g = torch.Generator()
    g.manual_seed(1_000_003 * (seed + 1) + 7919 * (stage_index + 2) + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    steps = math.ceil(n / global_batch)
    need = steps * global_batch
    while len(perm) < need:
        perm += perm[: need - len(perm)]
    return [perm[i * global_batch:(i + 1) * global_batch] for i in range(steps)]


def rank_micro_batches(global_batch: list[int], rank: int, world: int, accum: int) -> list[list[int]]:
    per_rank = len(global_batch) // world
    mine = global_batch[rank * per_rank:(rank + 1) * per_rank]
    micro = per_rank // accum
    return [mine[i * micro:(i + 1) * micro] for i in range(accum)]


def count_targets(batch: dict) -> int:
    """Answer tokens the LM loss of ``batch`` counts: labels != -100 after the causal shift."""
    labels = batch.get("labels")
    if labels is None:
        return 0
    return int((labels[:, 1:] != -100).sum())


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device)
        elif isinstance(value, dict):
            out[key] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        else:
            out[key] = value
    return out


class PlainBackend:
    """Single-process optimisation with gradient accumulation, clipping and mixed precision
    (``bf16``: autocast; ``fp16``: autocast with a gradient scaler, CUDA only)."""

    def __init__(self, model, optimizer, scheduler, accum: int, max_grad_norm: float,
                 precision: str = "fp32", device: torch.device = torch.device("cpu")):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accum, self.max_grad_norm = accum, max_grad_norm
        self.micro = 0
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("train.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def forward(self, batch, **kwargs):
        if self.autocast_dtype is None:
            return self.model(batch, **kwargs)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype):
            return self.model(batch, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss.float() / self.accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum:
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedBackend:
    """The same contract over a DeepSpeed engine (ZeRO, accumulation, clipping from the config)."""

    def __init__(self, model, optimizer, scheduler, ds_config: dict):
        import deepspeed

        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, model_parameters=params,
            config=ds_config)

    def forward(self, batch, **kwargs):
        return self.engine(batch, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def save(self, directory, tag: str) -> None:
        """DeepSpeed's own checkpoint (every rank writes its optimiser partition); collective."""
        self.engine.save_checkpoint(str(directory), tag=tag, exclude_frozen_parameters=True)

    def load(self, directory, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {directory}")

    def close(self) -> None:
        """Remove the engine's gradient hooks so the next stage's engine starts clean."""
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()


def train_stage(*, ctx, plan: StagePlan, methods: list, dataset, collate: Callable[[list], dict],
                train_cfg: dict, dist, ds_config: dict | None, logger,
                start_step: int = 0, optimizer_state: dict | None = None,
                deepspeed_resume: tuple[Any, str] | None = None,
                on_checkpoint: Callable[[int, Any, Any, Any], None] | None = None) -> dict:
    """Train one stage; returns {"steps", "seconds", "loss"}.

    Resuming at ``start_step`` restores the optimiser and schedule from ``optimizer_state`` (plain
    backend) or from DeepSpeed's own checkpoint ``deepspeed_resume = (directory, tag)``.
    """
    model = ctx.model
    hooks = MethodHooks.of(methods, ctx)
    accum, world = train_cfg["grad_accum"], dist.world_size
    global_batch = global_batch_size(train_cfg, world)
    n = len(plan.samples)
    if n == 0:
        raise ValueError(f"stage {plan.key!r} has no training samples")
    steps_per_epoch = math.ceil(n / global_batch)
    total = plan.max_steps or max(1, math.ceil(plan.epochs * steps_per_epoch))

    groups = param_groups(model, plan.lr, train_cfg["weight_decay"], plan.mm_projector_lr)
    groups = hooks.param_groups(model, groups, plan.lr, train_cfg["weight_decay"])
    if not groups:
        raise ValueError(f"stage {plan.key!r}: nothing is trainable (check train.trainable and "
                         f"the methods' trainable hooks)")
    optimizer = torch.optim.AdamW(groups, lr=plan.lr, foreach=False)
    scheduler = make_scheduler(optimizer, train_cfg, total)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
    if ds_config is not None:
        backend = DeepSpeedBackend(model, optimizer, scheduler, ds_config)
        if deepspeed_resume is not None:
            backend.load(*deepspeed_resume)
    else:
        backend = PlainBackend(model, optimizer, scheduler, accum, train_cfg["max_grad_norm"],
                               train_cfg.get("precision", "fp32"), dist.device)

    model.train()
    started = time.perf_counter()
    step, last_loss = start_step, float("nan")
    bar = tqdm(total=total, initial=start_step, desc=f"train {plan.key}", disable=not dist.is_main,
               mininterval=1.0, leave=False, dynamic_ncols=True)
    epoch = start_step // steps_per_epoch
    data_seed = train_cfg.get("data_seed")  # .get: recipes saved before the key
    order_seed = train_cfg["seed"] if data_seed is None else data_seed
    while step < total:
        batches = epoch_order(n, order_seed, plan.index, epoch, global_batch)
        first = step - epoch * steps_per_epoch
        steps_here = range(first, min(steps_per_epoch, first + total - step))
        micro_lists = {k: rank_micro_batches(batches[k], dist.rank, world, accum) for k in steps_here}
        stream = micro_batch_stream(dataset, collate, [m for k in steps_here for m in micro_lists[k]],
                                    train_cfg.get("dataloader_num_workers", 0))
        for k in steps_here:
            terms_sum: dict[str, float] = {}
            loss_sum = 0.0
            micro_batches = [to_device(next(stream), dist.device) for _ in micro_lists[k]]
            targets = dist.all_reduce_sum(sum(count_targets(b) for b in micro_batches))
            # HF divides the summed loss by num_items_in_batch: the global count / (world x accum)
            per_micro = max(targets, 1) / (world * accum)
            for batch in micro_batches:
                hooks.before_forward(batch)
                outputs = backend.forward(batch, num_items_in_batch=per_micro)
                loss = outputs.loss
                for name, value in hooks.loss_terms(batch, outputs).items():
                    loss = loss + value
                    terms_sum[name] = terms_sum.get(name, 0.0) + float(value.detach()) / accum
                backend.backward(loss)
                backend.step()
                loss_sum += float(outputs.loss.detach()) / (world * accum)
            loss_sum = dist.all_reduce_sum(loss_sum)  # the global batch's token-mean loss
            step += 1
            last_loss = loss_sum
            hooks.after_step(ctx.stage, step)
            if k == steps_per_epoch - 1 or step == total:  # before a checkpoint: resume sees it
                hooks.after_epoch(ctx.stage, epoch)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", refresh=False)
            if step % train_cfg["log_every_steps"] == 0 or step == total:
                logger.log({"stage": plan.key, "step": step, "loss": loss_sum,
                            "lr": optimizer.param_groups[0]["lr"], **terms_sum})
            every = train_cfg["save_every_steps"]
            if on_checkpoint and every and step % every == 0 and step < total:
                on_checkpoint(step, optimizer, scheduler, backend)
        epoch += 1
    bar.close()
    backend.close()
    model.eval()
    return {"steps": step, "seconds": time.perf_counter() - started, "loss": last_loss}

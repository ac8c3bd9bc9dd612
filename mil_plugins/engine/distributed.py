"""Single process or DeepSpeed: who we are, how data is sharded, and the filled ZeRO config.

The same code path runs everywhere. Launched by ``deepspeed`` (``RANK``/``WORLD_SIZE`` set), we
initialise torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU) and train through a
DeepSpeed engine; otherwise, a plain PyTorch loop in one process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    deepspeed: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a list of one in a single process)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, value: float) -> float:
        """The sum of ``value`` over every rank (``value`` itself in a single process)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return float(t.item())

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def launched_by_deepspeed() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_distributed(local_rank: int | None = None) -> Dist:
    if not launched_by_deepspeed():
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return Dist(device=device)
    import deepspeed

    local = int(os.environ.get("LOCAL_RANK", local_rank or 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return Dist(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                local_rank=local, deepspeed=True, device=device)


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    per = batch_size // (world_size * grad_accum)
    if per < 1 or per * world_size * grad_accum != batch_size:
        raise ValueError(f"train.batch_size {batch_size} must be a multiple of world size "
                         f"{world_size} x grad_accum {grad_accum}")
    return per


def fill_deepspeed_config(path: str | Path, train: dict, world_size: int) -> dict:
    """Load a ZeRO JSON and replace its ``"auto"`` values from the recipe's ``train`` section."""
    config = json.loads(Path(path).read_text())
    micro = micro_batch_size(train["batch_size"], world_size, train["grad_accum"])
    auto = {
        "train_batch_size": train["batch_size"],
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": train["grad_accum"],
        "gradient_clipping": train["max_grad_norm"],
    }

    def fill(node: dict, values: dict) -> None:
        for key, value in list(node.items()):
            if isinstance(value, dict):
                fill(value, values)
            elif value == "auto" and key in values:
                node[key] = values[key]

    fill(config, auto)
    for key, value in auto.items():
        config.setdefault(key, value)
    precision = train["precision"]
    for name in ("bf16", "fp16"):
        section = config.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = precision == name
    leftover = [k for k, v in _walk(config) if v == "auto"]
    if leftover:
        raise ValueError(f"{path}: cannot fill 'auto' for {', '.join(leftover)} from the recipe")
    return config


def _walk(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value

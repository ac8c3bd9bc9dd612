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
        if backend == "gloo":
            torch.distributed.barrier()  # every rank has mapped every other rank's buffer
            unlink_shm_allreduce_buffer(torch.distributed.get_rank())
    return Dist(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                local_rank=local, deepspeed=True, device=device)


def shm_allreduce_buffer(rank: int) -> Path:
    """The POSIX shared-memory file in which DeepSpeed's CPU allreduce keeps ``rank``'s workspace
    (``shm.cpp``: ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_shm_allreduce_buffer(rank: int) -> None:
    """Remove this rank's allreduce buffer name once every rank has mapped it.

    DeepSpeed (0.19) creates one 69 MB buffer per rank in ``/dev/shm`` when it initialises on CPU
    and never unlinks it: every 2-rank CPU run left 138 MB of RAM behind, and a test machine had
    19 GB of them (its RAM then starved DeepSpeed's own op build). The mappings stay valid after
    the name is gone, so the run goes on unchanged, and a run killed at any point leaves nothing.
    """
    try:
        shm_allreduce_buffer(rank).unlink()
    except FileNotFoundError:  # not all ranks on this machine: DeepSpeed made no buffer
        pass


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    per = batch_size // (world_size * grad_accum)
    if per < 1 or per * world_size * grad_accum != batch_size:
        raise ValueError(f"train.batch_size {batch_size} must be a multiple of world size "
                         f"{world_size} x grad_accum {grad_accum}")
    return per


#: the ZeRO configs that ship with the package (``recipes/deepspeed`` links here)
SHIPPED_DEEPSPEED = Path(__file__).resolve().parents[1] / "recipe" / "deepspeed"
DEFAULT_DEEPSPEED = "zero2.json"


def resolve_deepspeed_config(value: str | None) -> Path:
    """The ZeRO JSON a recipe's ``train.deepspeed`` names: a file that exists as given, else a
    shipped config of that file name (``zero3``, ``zero3.json`` and ``recipes/deepspeed/zero3.json``
    all name it, from any working directory and from an installed wheel); ``None``: ``zero2``."""
    if value is None:
        return SHIPPED_DEEPSPEED / DEFAULT_DEEPSPEED
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = path.name if path.suffix == ".json" else f"{path.name}.json"
    if (SHIPPED_DEEPSPEED / name).is_file():
        return SHIPPED_DEEPSPEED / name
    shipped = ", ".join(sorted(p.stem for p in SHIPPED_DEEPSPEED.glob("*.json")))
    raise ValueError(f"train.deepspeed: {value}: no such file, and not a shipped config "
                     f"(shipped: {shipped})")


def global_batch_size(train: dict, world_size: int) -> int:
    """The global batch: ``per_device_train_batch_size x world size x grad_accum`` when the
    recipe gives HF's per-device size, else ``train.batch_size``."""
    per_device = train.get("per_device_train_batch_size")
    if per_device is not None:
        return int(per_device) * world_size * train["grad_accum"]
    return train["batch_size"]


#: sections of an HF-Trainer-style ZeRO JSON that describe what the recipe already sets: the
#: recipe's AdamW and schedule are handed to DeepSpeed as client objects, so these go
CLIENT_SECTIONS = ("optimizer", "scheduler")


def fill_deepspeed_config(path: str | Path, train: dict, world_size: int,
                          hidden_size: int | None = None) -> dict:
    """Load a ZeRO JSON and replace its ``"auto"`` values from the recipe's ``train`` section,
    as HF's Trainer does: batch sizes, accumulation, clipping, bf16/fp16, and with
    ``hidden_size`` (the LLM's width) ZeRO's bucket sizes (``reduce_bucket_size`` = h²,
    ``stage3_prefetch_bucket_size`` = 0.9 h², ``stage3_param_persistence_threshold`` = 10 h).
    ``optimizer`` / ``scheduler`` sections are checked and dropped: the recipe's AdamW (``lr``,
    ``weight_decay``) and ``transformers.get_scheduler`` schedule are the ones used, so a value
    there other than ``"auto"`` that disagrees with the recipe is an error."""
    config = json.loads(Path(path).read_text())
    batch = global_batch_size(train, world_size)
    micro = micro_batch_size(batch, world_size, train["grad_accum"])
    auto: dict = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": train["grad_accum"],
        "gradient_clipping": train["max_grad_norm"],
    }
    if hidden_size:
        auto.update(reduce_bucket_size=hidden_size * hidden_size,
                    stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
                    stage3_param_persistence_threshold=10 * hidden_size)
    _check_client_sections(config, train, path)

    def fill(node: dict, values: dict) -> None:
        for key, value in list(node.items()):
            if isinstance(value, dict):
                fill(value, values)
            elif value == "auto" and key in values:
                node[key] = values[key]

    fill(config, auto)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        config.setdefault(key, auto[key])
    precision = train["precision"]
    for name in ("bf16", "fp16"):
        section = config.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = precision == name
    leftover = [k for k, v in _walk(config) if v == "auto"]
    if leftover:
        raise ValueError(f"{path}: cannot fill 'auto' for {', '.join(leftover)} from the recipe")
    return config


def _check_client_sections(config: dict, train: dict, path) -> None:
    """Drop ``optimizer`` / ``scheduler`` (see :func:`fill_deepspeed_config`), refusing values
    that say something other than the recipe."""
    optimizer = config.pop("optimizer", None)
    config.pop("scheduler", None)  # HF fills it from the Trainer's schedule: ours is the recipe's
    if optimizer is None:
        return
    kind = str(optimizer.get("type", "AdamW"))
    if kind.lower() not in ("adam", "adamw"):
        raise ValueError(f"{path}: optimizer.type {kind!r}: the recipe trains with AdamW; remove "
                         f"the optimizer section or set its type to AdamW")
    ours = {"lr": ("train.lr", train["lr"]), "weight_decay": ("train.weight_decay", train["weight_decay"]),
            "betas": ("torch.optim.AdamW's default", [0.9, 0.999]),
            "eps": ("torch.optim.AdamW's default", 1e-8)}
    for key, value in (optimizer.get("params") or {}).items():
        if value == "auto" or key not in ours:
            continue
        where, want = ours[key]
        same = ([float(v) for v in value] == want if isinstance(value, list)
                else float(value) == float(want))
        if not same:
            raise ValueError(f"{path}: optimizer.params.{key} is {value!r} but the run uses "
                             f"{where} = {want!r}; set it to \"auto\" (or change the recipe)")


def _walk(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value

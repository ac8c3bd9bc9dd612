"""Training logs: JSONL always, plus the ``report_to`` integrations (TensorBoard, Weights &
Biases); written by rank 0 only.

A record's numbers become scalars named ``<stage>/<key>`` at its ``step``; a nested mapping of
numbers (``"eval": {stage name: score}``, logged after each stage's evaluation) becomes
``<key>/<name>`` at its ``after_stage`` (1, 2, ...), so the accuracy of every stage seen so far is
a curve over the stages trained.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence


def report_targets(output: dict) -> list[str]:
    """The recipe's ``output.report_to``, or ``["tensorboard"]`` / ``[]`` from ``output.tensorboard``."""
    if output.get("report_to") is not None:
        return list(output["report_to"])
    return ["tensorboard"] if output.get("tensorboard", True) else []


def _numbers(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("time", "step", "after_stage")}


class JsonlLogger:
    """Training logs as JSONL and to the ``report_to`` targets, written by rank 0 only.

    ``report_to``: ``True``/``False`` (TensorBoard or nothing, the old form) or a list of
    ``"tensorboard"``, ``"wandb"``. W&B runs in the ``WANDB_PROJECT`` project (default
    ``mil-plugins``), named after the run folder, with the recipe as its config."""

    def __init__(self, out: Path, enabled: bool, report_to: bool | Sequence[str] = True,
                 run_config: dict | None = None):
        self.enabled = enabled
        self.path = out / "logs" / "train.jsonl"
        self.writer = None
        self.wandb = None
        self.step = 0
        targets = (["tensorboard"] if report_to else []) if isinstance(report_to, bool) else report_to
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if "tensorboard" in targets:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out / "tensorboard"))
            if "wandb" in targets:
                import wandb
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mil-plugins"),
                                        name=Path(out).name, dir=str(out), config=run_config or {})

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.step += 1
        prefix = record.get("stage", "run")
        scalars: dict[str, tuple[float, int]] = {
            f"{prefix}/{k}": (v, record.get("step", self.step)) for k, v in _numbers(record).items()}
        for key, value in record.items():
            if isinstance(value, dict):
                at = record.get("after_stage", self.step)
                scalars.update((f"{key}/{name}", (v, at)) for name, v in _numbers(value).items())
        if self.writer is not None:
            for tag, (value, at) in scalars.items():
                self.writer.add_scalar(tag, value, at)
            self.writer.flush()
        if self.wandb is not None and scalars:
            self.wandb.log({tag: value for tag, (value, _) in scalars.items()})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

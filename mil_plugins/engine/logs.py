"""Training logs: JSONL always, TensorBoard scalars when enabled; written by rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path


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

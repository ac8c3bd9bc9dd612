#!/usr/bin/env python
"""``tools/train.py`` that dies (``os._exit(137)``, as a SIGKILL would) right after the rolling
checkpoint of ``STAGE`` at ``STEP`` is committed: a deterministic mid-stage crash for the resume
check of bench/gpu_check.py (a kill timed from outside races a fast GPU).

    python bench/_train_then_die.py STAGE STEP RECIPE [key=value ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> int:
    from mil_plugins.cli import train as train_cli
    from mil_plugins.engine import run as run_mod

    stage, step, args = argv[0], int(argv[1]), argv[2:]
    save = run_mod.Runner._save

    def save_then_die(self, path, optimizer_state=None):
        save(self, path, optimizer_state)
        if self.state.get("in_stage") == stage and self.state.get("step") == step:
            sys.stdout.flush()
            os._exit(137)

    run_mod.Runner._save = save_then_die
    return train_cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

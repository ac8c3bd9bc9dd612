#!/usr/bin/env python
"""Train a recipe stage after stage.

    deepspeed tools/train.py recipes/quickstart.yaml [key=value ...]     # DeepSpeed, any scale
    python tools/train.py recipes/quickstart.yaml [key=value ...]        # one process
    python tools/train.py recipes/quickstart.yaml --resume               # continue a killed run

The deepspeed launcher's ``--local_rank`` is accepted and ignored (ranks come from the environment).
"""

import sys

from mil_plugins.cli import run_friendly
from mil_plugins.cli.train import main

if __name__ == "__main__":
    sys.exit(run_friendly(main, sys.argv[1:]))

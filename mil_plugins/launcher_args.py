"""The arguments a launcher or an HF user passes to ``tools/train.py`` and ``mil train``."""

from __future__ import annotations

import argparse


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """``--local_rank`` (the deepspeed launcher's; ranks come from the environment) and HF's
    ``--deepspeed PATH.json`` (the same as ``train.deepspeed=PATH.json``)."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; ignored otherwise")
    parser.add_argument("--deepspeed", metavar="PATH.json", default=None,
                        help="a ZeRO JSON (HF-Trainer style, \"auto\" values filled from the recipe); "
                             "same as train.deepspeed=PATH.json; used under the deepspeed launcher")

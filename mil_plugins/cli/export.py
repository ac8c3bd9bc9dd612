"""``mil export CHECKPOINT --to llava|llava-dir|hf|peft OUT``: print the files written."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to LLaVA or transformers layout")
    p.add_argument("checkpoint")
    p.add_argument("--to", required=True, choices=["llava", "llava-dir", "hf", "peft"],
                   help="llava: mm_projector.bin per modality; llava-dir: a directory "
                        "LlavaLlamaForCausalLM.from_pretrained loads; hf: LlavaForConditionalGeneration; "
                        "peft: the LLM's LoRA as a PEFT adapter directory")
    p.add_argument("out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mil_plugins.export import export_checkpoint

    written = export_checkpoint(Path(args.checkpoint), args.to, Path(args.out))
    for path in written:
        print(path)
    return 0

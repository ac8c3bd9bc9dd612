"""``mil train RECIPE [key=value ...]`` (and ``tools/train.py``): load the recipe, run it stage after
stage (:class:`~mil_plugins.engine.run.Runner`), print where the report is.

The deepspeed launcher's ``--local_rank`` is accepted and ignored (ranks come from the environment).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mil_plugins.launcher_args import add_launcher_args


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run a recipe (same as tools/train.py)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output.dir holding another run's results (deletes them)")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="with --resume: a recipe key allowed to differ (e.g. train.log_every_steps)")
    add_launcher_args(p)  # --local_rank (the deepspeed launcher's), --deepspeed PATH.json
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    argv = [args.recipe, *args.overrides]
    if args.resume:
        argv.append("--resume")
    if args.overwrite:
        argv.append("--overwrite")
    for key in args.allow_change:
        argv += ["--allow-change", key]
    if args.deepspeed:
        argv += ["--deepspeed", args.deepspeed]
    return main(argv)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description="Run a mil-plugins recipe.")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output.dir that holds another run's results "
                             "(deletes them)")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="with --resume: allow this recipe key to differ from the checkpoint's "
                             "(only keys that do not change what is learned, e.g. "
                             "train.log_every_steps)")
    add_launcher_args(parser)
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.deepspeed:
        args.overrides.append(f"train.deepspeed={args.deepspeed}")
    import torch

    from mil_plugins.engine.run import Runner
    from mil_plugins.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    threads = os.environ.get("MIL_NUM_THREADS") or recipe["train"]["num_threads"]
    if threads:
        torch.set_num_threads(int(threads))
    if args.allow_change and not args.resume:
        raise ValueError("--allow-change only applies with --resume")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in output.dir, --overwrite deletes it: "
                         "give one of them")
    runner = Runner(recipe, resume=args.resume, overwrite=args.overwrite,
                    allow_changes=args.allow_change)
    try:
        metrics = runner.run()
    finally:
        runner.folder.release()
    if runner.dist.is_main:
        out = Path(recipe["output"]["dir"])
        print(f"[mil] done: {out / 'report.md'}")
        if metrics:
            print(f"[mil] final average accuracy {metrics.get('final_average_accuracy')}, "
                  f"forgetting {metrics.get('forgetting')}")
    return 0

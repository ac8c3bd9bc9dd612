"""``mil check-data MANIFEST|RECIPE``: run every sample through its preprocessors."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("check-data", help="run every sample of a manifest, or of every manifest "
                                          "a recipe reads, through its preprocessors")
    p.add_argument("manifest", help="a manifest (JSON / JSONL), or a recipe (.yaml): then exactly "
                                    "what the run reads, with its data.root and modality options")
    p.add_argument("overrides", nargs="*", help="with a recipe: key=value overrides")
    p.add_argument("--root", help="data root the media paths are relative to (default: the "
                                  "manifest's folder)")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mil_plugins.data.check import run_check_data

    if Path(args.manifest).suffix.lower() in (".yaml", ".yml"):
        from mil_plugins.engine.preflight import run_check_recipe

        if args.root:
            raise ValueError("check-data RECIPE reads data.root from the recipe; override it "
                             "with data.root=DIR instead of --root")
        return run_check_recipe(args.manifest, args.overrides, workers=args.workers)
    if args.overrides:
        raise ValueError(f"key=value overrides ({args.overrides[0]}) apply to a recipe; "
                         f"{args.manifest} is a manifest")
    return run_check_data(Path(args.manifest), Path(args.root) if args.root else None,
                          workers=args.workers)

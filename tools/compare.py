#!/usr/bin/env python
"""Run several recipes one after another and print one comparison table (markdown).

    python tools/compare.py recipes/mcl/small_*.yaml --out docs/results-small.md

Each recipe runs as ``python tools/train.py RECIPE [overrides]`` in its own process; a recipe
whose ``metrics.json`` already exists for all its stages is not run again (pass --rerun).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mil_plugins.recipe import load_recipe  # noqa: E402
from mil_plugins.report import compare_runs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--override", action="append", default=[], help="key=value for every recipe")
    parser.add_argument("--out", help="also write the table here")
    parser.add_argument("--rerun", action="store_true")
    args = parser.parse_args(argv)
    outputs = []
    for recipe_path in args.recipes:
        recipe = load_recipe(recipe_path, args.override)
        out = Path(recipe["output"]["dir"])
        metrics = out / "metrics.json"
        done = metrics.exists() and json.loads(metrics.read_text()).get(
            "completed_stages") == len(recipe["stages"])
        if args.rerun or not done:
            print(f"[compare] running {recipe_path}", flush=True)
            subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), recipe_path,
                            *args.override, "--overwrite"], check=True, cwd=ROOT)
        outputs.append(out)
    table = compare_runs(outputs)
    command = "python tools/compare.py " + " ".join(args.recipes + [f"--override {o}" for o in args.override])
    text = f"{table}\n\nProduced by: `{command}`\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

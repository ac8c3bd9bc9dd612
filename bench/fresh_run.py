#!/usr/bin/env python
"""How long a recipe takes from nothing: data generation, encoder pretraining and every stage.

    python bench/fresh_run.py recipes/quickstart.yaml [key=value ...] [--json out.json]

Runs ``tools/train.py RECIPE`` as a new user's first run does, with every generated or cached
input sent to an empty temporary folder (the benchmark under ``data.root``, the pretraining set
and its encoders under ``encoder_pretraining.data.root``), so nothing a earlier run left is found.
Prints and records the wall time of the whole command, how it splits (encoder pretraining, each
from its weights' sidecar; the warm-up and the stages, from the run's ``metrics.json``; the rest:
data generation, model building, evaluation), the machine (CPU cores this process may use, the
load average before starting) and the run's final average accuracy, so a re-run on another
machine can be compared. This is the quickstart's time budget (``docs/results.md``,
``README.md``): an absolute time on CPU, meaningful only with the machine beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fresh_overrides(recipe: dict, tmp: Path) -> list[str]:
    """Overrides that point every generated or cached input of ``recipe`` into ``tmp``."""
    out = [f"data.root={tmp / 'data'}", f"output.dir={tmp / 'run'}"]
    if recipe["data"].get("generate") is None:
        raise SystemExit("fresh_run: the recipe does not generate its data (data.generate), so a "
                         "fresh run would have nothing to read")
    pre = recipe.get("encoder_pretraining")
    if pre is not None:
        if pre["data"].get("generate") is None:
            raise SystemExit("fresh_run: encoder_pretraining.data is not generated")
        out += [f"encoder_pretraining.data.root={tmp / 'pretrain'}",
                f"encoder_pretraining.dir={tmp / 'pretrain' / 'encoders'}"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value recipe overrides")
    parser.add_argument("--json", help="write the measurement here")
    args = parser.parse_args(argv)
    from mil_plugins.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    load_before = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="mil-fresh-") as name:
        tmp = Path(name)
        command = [sys.executable, str(ROOT / "tools" / "train.py"), args.recipe, *args.overrides,
                   *fresh_overrides(recipe, tmp)]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"fresh_run: tools/train.py exited with {done.returncode}")
        metrics = json.loads((tmp / "run" / "metrics.json").read_text())
        pretraining = {}
        for sidecar in sorted((tmp / "pretrain" / "encoders").glob("*.json")):
            info = json.loads(sidecar.read_text())
            pretraining[info["modality"]] = info["seconds"]
    workers = int((recipe.get("encoder_pretraining") or {}).get("workers") or 1)
    stages = metrics["seconds"]
    result = {
        "recipe": args.recipe, "overrides": args.overrides, "wall_seconds": round(wall, 1),
        "encoder_pretraining_seconds": pretraining, "encoder_pretraining_workers": workers,
        "stage_seconds": [round(s, 1) for s in stages],
        "final_average_accuracy": metrics["final_average_accuracy"],
        "machine": {"cores": cores, "load_average_before": round(load_before, 2),
                    "platform": platform.platform(), "python": platform.python_version()},
        "command": " ".join(["python bench/fresh_run.py"] + (argv if argv is not None else sys.argv[1:])),
    }
    from mil_plugins.compare import render_fresh_run

    print(render_fresh_run(result))
    if args.json:
        from mil_plugins.atomic import atomic_write_json
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

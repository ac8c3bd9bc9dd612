#!/usr/bin/env python
"""Compare methods over seeds: run each recipe N times, or tabulate run folders that exist.

    python tools/compare.py recipes/mcl/small_finetune.yaml recipes/mcl/small_joint.yaml \\
        --seeds 3 --json docs/results/small.json --update-docs docs/results.md
    python tools/compare.py recipes/a.yaml train.lr=1e-3 recipes/b.yaml   # per-recipe overrides
    python tools/compare.py --runs runs/compare/small_finetune/seed-0 runs/compare/small_finetune/seed-1

Each (recipe, seed) runs as ``python tools/train.py RECIPE [overrides] train.seed=S
output.dir=RUNS_ROOT/LABEL/seed-S`` in its own process; a run whose ``metrics.json`` already
covers every stage and whose saved recipe is the one given now is not run again (``--rerun``
forces it; a finished run of another recipe, e.g. from before a default changed, is re-run).
``key=value`` arguments after a recipe apply to that recipe only; ``--override`` applies to all.
The label of a recipe is its file name without ``.yaml`` (or ``--label``). Printed: per method, each metric as mean ± std over
seeds with its 95% t-interval, paired differences to ``--reference`` (default finetune) with
their intervals, and per-task scores beside each task's chance level. ``--json`` writes the
numbers; ``--update-docs DOC`` re-renders the results blocks of DOC from their results files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mil_plugins.compare import aggregate, render, update_doc  # noqa: E402
from mil_plugins.engine.resume import finished_run  # noqa: E402
from mil_plugins.recipe import load_recipe  # noqa: E402


def split_recipes(items: list[str]) -> list[tuple[str, list[str]]]:
    """``[a.yaml, k=v, b.yaml]`` -> ``[(a.yaml, [k=v]), (b.yaml, [])]``."""
    out: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" in item and not item.endswith((".yaml", ".yml")):
            if not out:
                raise SystemExit(f"compare: override {item!r} comes before any recipe")
            out[-1][1].append(item)
        else:
            out.append((item, []))
    return out


def run_one(recipe: str, overrides: list[str], seed: int, out: Path, rerun: bool) -> Path:
    full = [*overrides, f"train.seed={seed}", f"output.dir={out}"]
    loaded = load_recipe(recipe, full)  # validate before starting anything
    if not rerun:
        done, changed = finished_run(out, loaded)
        if done:
            print(f"[compare] {out}: done before with this recipe, not re-run", flush=True)
            return out
        if changed:
            print(f"[compare] {out}: finished, but {changed}; running it again", flush=True)
    print(f"[compare] running {recipe} seed {seed} -> {out}", flush=True)
    # a folder holding an unfinished run (killed) is started again from scratch
    if loaded.get("federated"):  # `mil federate`, clients in this process (the same rounds as on
        # Flower's engines, without starting Ray for every seed)
        command = [sys.executable, "-m", "mil_plugins.cli", "federate", recipe, *full,
                   "--overwrite", "--engine", "inprocess"]
    else:
        command = [sys.executable, str(ROOT / "tools" / "train.py"), recipe, *full, "--overwrite"]
    subprocess.run(command, check=True, cwd=ROOT)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("recipes", nargs="*", help="RECIPE [key=value ...] ...")
    parser.add_argument("--runs", nargs="+", default=[], help="existing run folders to tabulate "
                        "(grouped by the folder above seed-N, else by method)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per recipe (0..N-1)")
    parser.add_argument("--seed-list", help="explicit seeds, e.g. 0,1,2 (overrides --seeds)")
    parser.add_argument("--override", action="append", default=[], help="key=value for every recipe")
    parser.add_argument("--label", action="append", default=[], help="a label per recipe, in order")
    parser.add_argument("--runs-root", default="runs/compare")
    parser.add_argument("--reference", default="finetune", help="paired differences to this label")
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--json", help="write the results file here")
    parser.add_argument("--out", help="write the markdown here")
    parser.add_argument("--update-docs", nargs="*", default=[], help="re-render results blocks")
    args = parser.parse_args(argv)
    seeds = ([int(s) for s in args.seed_list.split(",")] if args.seed_list
             else list(range(args.seeds)))
    groups: dict[str, list[Path]] = {}
    for k, (recipe, overrides) in enumerate(split_recipes(args.recipes)):
        label = args.label[k] if k < len(args.label) else Path(recipe).stem
        for seed in seeds:
            out = Path(args.runs_root) / label / f"seed-{seed}"
            groups.setdefault(label, []).append(
                run_one(recipe, [*args.override, *overrides], seed, out, args.rerun))
    for d in map(Path, args.runs):
        label = d.parent.name if d.name.startswith("seed-") else \
            json.loads((d / "metrics.json").read_text()).get("method") or d.name
        groups.setdefault(label, []).append(d)
    if not groups:
        if not args.update_docs:
            parser.error("give recipes to run, --runs folders to tabulate, or --update-docs DOC")
        for doc in args.update_docs:
            print(f"[compare] {doc}: {update_doc(Path(doc), ROOT)} results block(s) re-rendered")
        return 0
    command = "python tools/compare.py " + " ".join(
        (argv if argv is not None else sys.argv[1:]))
    result = aggregate(groups, args.reference, command)
    text = render(result)
    print(text)
    if args.json:
        from mil_plugins.atomic import atomic_write_json
        atomic_write_json(args.json, result)
    if args.out:
        from mil_plugins.atomic import atomic_write_text
        atomic_write_text(args.out, text)
    for doc in args.update_docs:
        print(f"[compare] {doc}: {update_doc(Path(doc), ROOT)} results block(s) re-rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())

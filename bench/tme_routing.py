#!/usr/bin/env python
"""Where ``tme`` routes each stage's test inputs: the branch chosen from the input's own
descriptor against the branch that stage trained.

    python bench/tme_routing.py runs/x/checkpoints/stage-05-point [--json out.json]

Rebuilds the checkpoint's model (``mil eval``'s loader), runs ``tme``'s ``before_forward`` on every
stage's test split (the recipe's ``test`` manifests; the checkpoint's stages only) and prints, per
stage, the share of its test inputs that take the branch its own stage trained ("routed to own
branch"), and the full count of choices. Routing never reads task labels, so this is how often
the input alone finds the right branch.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def routing(checkpoint: Path, batch_size: int = 32) -> dict:
    from mil_plugins.engine.loading import load_for_eval
    from mil_plugins.methods.expansion import stage_key

    session = load_for_eval(checkpoint)
    tme = next((m for m in session.methods if m.name == "tme"), None)
    if tme is None:
        raise SystemExit(f"{checkpoint}: the recipe has no 'tme' method")
    recipe = session.recipe
    root = Path(recipe["data"]["root"])
    out = {"checkpoint": str(checkpoint), "assign": dict(tme.assign),
           "decisions": tme.decisions, "stages": {}}
    for i, st in enumerate(recipe["stages"]):
        key = stage_key(i)
        if key not in tme.assign or not st.get("test"):
            continue
        limit = recipe["data"].get("max_test_samples")
        samples = session.load_samples(Path(st["test"]), root)
        if limit:
            samples = samples[: int(limit)]
        chosen: Counter = Counter()
        for batch in session.make_loader(samples, mode="eval", batch_size=batch_size):
            tme.before_forward(session.ctx, batch)
            chosen.update(tme.last_choice or [])
        n = sum(chosen.values())
        own = tme.assign[key]
        out["stages"][st["name"]] = {"key": key, "branch": own, "n": n, "choices": dict(chosen),
                                     "own_share": (chosen[own] / n) if n else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    result = routing(args.checkpoint, args.batch_size)
    result["command"] = " ".join(["python bench/tme_routing.py"] +
                                 (argv if argv is not None else sys.argv[1:]))
    from mil_plugins.compare import render_tme_routing

    print(render_tme_routing(result), end="")
    if args.json:
        from mil_plugins.atomic import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

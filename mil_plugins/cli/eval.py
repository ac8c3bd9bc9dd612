"""``mil eval CHECKPOINT MANIFEST...``: rebuild the model of a stage checkpoint and score it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a checkpoint on one or more manifests")
    p.add_argument("checkpoint")
    p.add_argument("manifest", nargs="+")
    p.add_argument("--root")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="write the scores as JSON here")
    p.add_argument("--choices", choices=("recipe", "generate", "task", "sample"),
                   default="recipe",
                   help="generate every answer, or pick each exact-match answer among its "
                        "task's answers (task) or its own options (sample); default: as the "
                        "checkpoint's eval.choices")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return eval_checkpoint_cli(Path(args.checkpoint), [Path(m) for m in args.manifest],
                               root=Path(args.root) if args.root else None,
                               batch_size=args.batch_size, out=args.out,
                               choices={"generate": None}.get(args.choices, args.choices))


def eval_checkpoint_cli(checkpoint: Path, manifests: list[Path], root: Path | None = None,
                        batch_size: int = 16, out: str | None = None,
                        choices: str | None = "recipe") -> int:
    """``mil eval CHECKPOINT MANIFEST...``: rebuild the model of a stage checkpoint and score it
    (answers generated or chosen as ``choices`` says: ``"task"``, None, or ``"recipe"``: as the
    checkpoint's ``eval.choices``)."""
    from mil_plugins.engine.loading import load_for_eval
    from mil_plugins.evaluate import predict, score_predictions

    session = load_for_eval(checkpoint)
    results = {}
    for manifest in manifests:
        samples = session.load_samples(manifest.resolve(), root)
        rows = predict(session.model, samples, session.make_loader, methods=session.methods,
                       ctx=session.ctx, batch_size=batch_size,
                       max_new_tokens=session.recipe["eval"]["max_new_tokens"], desc=manifest.name,
                       options=session.answer_options(samples, choices))
        results[str(manifest)] = score_predictions(rows)
        result = results[str(manifest)]
        tasks = ", ".join(f"{t} {s:.1f}" for t, s in result["tasks"].items())
        print(f"{manifest}: {result['score']:.2f} over {result['n']} samples ({tasks})")
    if out:
        from mil_plugins.atomic import atomic_write_json
        atomic_write_json(out, results)
    else:
        json.dump(results, sys.stdout, indent=2)
        print()
    return 0

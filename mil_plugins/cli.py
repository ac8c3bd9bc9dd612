"""The ``mil`` command: plugins, make-benchmark, check-data, train, federate, eval, export.

Each sub-command imports what it needs only when it runs, so ``mil plugins`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def cmd_plugins(args: argparse.Namespace) -> int:
    from mil_plugins.plugins import all_records

    rows = all_records(load=not args.no_load)
    if args.kind:
        rows = [r for r in rows if r["kind"] == args.kind]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ("kind", "name", "distribution", "version", "status")
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) if rows else len(h) for h in headers]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths)))
        if r["error"]:
            print(f"    entry point {r['entry_point']}: {r['error']}")
    failed = sum(r["status"] == "failed" for r in rows)
    if failed:
        print(f"\n{failed} plugin(s) failed to load; the others are usable.")
    return 0


def cmd_make_benchmark(args: argparse.Namespace) -> int:
    from mil_plugins.benchmark import make_benchmark

    out = Path(args.out)
    summary = make_benchmark(out, size=args.size, seed=args.seed, overwrite=args.overwrite,
                             sequence=args.sequence)
    for modality, splits in summary.get("splits", {}).items():
        counts = ", ".join(f"{split} {info['num_samples']}" for split, info in splits.items())
        print(f"{modality:6s} {counts}  ({out / modality}/*.json)")
    state = "generated" if summary.get("generated") else "already there"
    for name, info in (summary.get("mixed") or {}).get("stages", {}).items():
        print(f"{name:13s} train {info['train']['num_samples']}, test {info['test']['num_samples']}"
              f"  ({out / info['train']['manifest']})")
    print(f"{args.size} benchmark, seed {args.seed}: {state}; dataset card: docs/benchmark.md, "
          f"full summary: {out / 'benchmark.json'}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
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


def cmd_train(args: argparse.Namespace) -> int:
    from mil_plugins.engine.run import main as train_main

    argv = [args.recipe, *args.overrides]
    if args.resume:
        argv.append("--resume")
    if args.overwrite:
        argv.append("--overwrite")
    for key in args.allow_change:
        argv += ["--allow-change", key]
    if args.deepspeed:
        argv += ["--deepspeed", args.deepspeed]
    return train_main(argv)


def cmd_federate(args: argparse.Namespace) -> int:
    from mil_plugins.federated.cli import run

    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from mil_plugins.evaluate import eval_checkpoint_cli

    return eval_checkpoint_cli(Path(args.checkpoint), [Path(m) for m in args.manifest],
                               root=Path(args.root) if args.root else None,
                               batch_size=args.batch_size, out=args.out,
                               choices={"generate": None}.get(args.choices, args.choices))


def cmd_export(args: argparse.Namespace) -> int:
    from mil_plugins.export import export_checkpoint

    written = export_checkpoint(Path(args.checkpoint), args.to, Path(args.out))
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mil", description=__doc__)
    # `deepspeed ... $(which mil) train RECIPE` runs `mil --local_rank=N train RECIPE`: accepted
    # before the command too, and ignored (ranks come from the environment)
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int,
                        default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list every installed plugin and whether it loads")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--kind", choices=["modality", "projector", "method", "aggregator"])
    p.add_argument("--no-load", action="store_true",
                   help="list what is installed without importing it (fast: no torch)")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("make-benchmark", help="generate the built-in modality-incremental benchmark")
    p.add_argument("out")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--sequence", default="modality", choices=["modality", "mixed"],
                   help="mixed: also a captioning and a QA stage per modality of audio, image and "
                        "video under OUT/mixed (MoInCL's setting; docs/benchmark.md)")
    p.set_defaults(func=cmd_make_benchmark)

    p = sub.add_parser("check-data", help="run every sample of a manifest, or of every manifest "
                                          "a recipe reads, through its preprocessors")
    p.add_argument("manifest", help="a manifest (JSON / JSONL), or a recipe (.yaml): then exactly "
                                    "what the run reads, with its data.root and modality options")
    p.add_argument("overrides", nargs="*", help="with a recipe: key=value overrides")
    p.add_argument("--root", help="data root the media paths are relative to (default: the "
                                  "manifest's folder)")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("train", help="run a recipe (same as tools/train.py)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output.dir holding another run's results (deletes them)")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="with --resume: a recipe key allowed to differ (e.g. train.log_every_steps)")
    from mil_plugins.launcher_args import add_launcher_args

    add_launcher_args(p)  # --local_rank (the deepspeed launcher's), --deepspeed PATH.json
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("federate", help="run a federated recipe on Flower (docs/federated.md)")
    from mil_plugins.federated.cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_federate)

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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint to LLaVA or transformers layout")
    p.add_argument("checkpoint")
    p.add_argument("--to", required=True, choices=["llava", "llava-dir", "hf", "peft"],
                   help="llava: mm_projector.bin per modality; llava-dir: a directory "
                        "LlavaLlamaForCausalLM.from_pretrained loads; hf: LlavaForConditionalGeneration; "
                        "peft: the LLM's LoRA as a PEFT adapter directory")
    p.add_argument("out")
    p.set_defaults(func=cmd_export)
    return parser


#: errors whose message says what is wrong (bad recipe, data, plugin, checkpoint): shown without
#: a traceback unless MIL_DEBUG=1
USER_ERRORS = (ValueError, TypeError, LookupError, OSError)


def run_friendly(func, *args) -> int:
    try:
        return int(func(*args) or 0)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as exc:
        if os.environ.get("MIL_DEBUG"):
            raise
        print(f"mil: error: {exc}", file=sys.stderr)
        print("(set MIL_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_friendly(args.func, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

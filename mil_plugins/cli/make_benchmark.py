"""``mil make-benchmark OUT``: generate the built-in modality-incremental benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("make-benchmark", help="generate the built-in modality-incremental benchmark")
    p.add_argument("out")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--sequence", default="modality", choices=["modality", "mixed"],
                   help="mixed: also a captioning and a QA stage per modality of audio, image and "
                        "video under OUT/mixed (MoInCL's setting; docs/benchmark.md)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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

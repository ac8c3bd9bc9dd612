#!/usr/bin/env python
"""Probe gap: what each frozen encoder carries vs what the MLLM learns from it.

    python bench/probe_gap.py recipes/quickstart.yaml [key=value ...] [--stages image,depth]
                              [--seeds 3] [--out docs/probe-gap.md] [--json probe-gap.json]
                              [--no-mllm]

For every stage of the recipe (any LLaVA-JSON data: the stage's ``train`` / ``test`` manifests),
per task:

* ``raw probe``: a linear probe on the preprocessed input, area-downsampled to <= 768 values
  (what is there without an encoder);
* ``encoder probe``: a linear probe on the frozen encoder's token features, all tokens
  concatenated (the ceiling of what a connector can pass on);
* ``MLLM alone``: the recipe's model trained on that stage alone (the recipe's warm-up, settings
  and connector; method ``finetune``), scored by the recipe's evaluation; with ``--seeds N``
  trained once per ``train.seed`` 0..N-1 and shown as mean ± standard deviation;
* ``ratio``: MLLM alone (its mean over seeds) / encoder probe; with several seeds also the
  number of seeds whose own ratio is >= 0.9.

Probes are multinomial logistic regressions, one per task, each distinct training answer a class,
scored with the task's metric (see ``mil_plugins/probe.py``). Chance is the benchmark's where the
data is the built-in benchmark, else the majority-class rate of the test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mil_plugins.probe import answer_of, pooled_raw, probe_tasks, render_probe_gap, vectors  # noqa: E402
from mil_plugins.recipe import load_recipe  # noqa: E402
from mil_plugins.stats import summarize  # noqa: E402


def _chance(stage_modality: str, task: str, test_samples: list) -> float:
    try:
        from mil_plugins.benchmark.concepts import chance_level
        return 100.0 * chance_level(stage_modality, task)
    except KeyError:
        answers = Counter(answer_of(s) for s in test_samples if (s.task or "default") == task)
        return 100.0 * max(answers.values()) / sum(answers.values())


def probe_stages(recipe: dict, stage_names: list[str] | None, seed: int) -> dict:
    """``{stage: {task: {"raw": s, "encoder": s, "chance": c}}}`` for the recipe's stages."""
    from mil_plugins.engine.distributed import Dist
    from mil_plugins.engine.session import Session

    session = Session(recipe, Dist())
    out = {}
    for stage in session.stages:
        if stage_names and stage.name not in stage_names:
            continue
        if not stage.modality or not stage.test_samples:
            continue
        m = stage.modality
        plugin = session.plugins[m]

        def encoded(sample):
            kind, x = session._media_loader(m, sample.media[m][0])
            return session.model.encode(m, x[None], kind)[0]

        def raw(sample):
            return pooled_raw(plugin.preprocess(sample.media[m][0]))

        with torch.no_grad():
            enc_tr, enc_te = vectors(stage.train_samples, encoded), vectors(stage.test_samples, encoded)
            raw_tr, raw_te = vectors(stage.train_samples, raw), vectors(stage.test_samples, raw)
        enc = probe_tasks(enc_tr, enc_te, seed)
        rw = probe_tasks(raw_tr, raw_te, seed)
        out[stage.name] = {t: {"chance": _chance(m, t, stage.test_samples), "raw": rw.get(t),
                               "encoder": enc[t]} for t in enc}
        print(f"[probe-gap] probes {stage.name}: " +
              ", ".join(f"{t} enc {v['encoder']:.1f} raw {v['raw']:.1f}" for t, v in out[stage.name].items()),
              flush=True)
    return out


def train_alone(recipe: dict, stage_name: str, run_dir: Path, seed: int | None = None) -> dict:
    """Per-task scores of the recipe's model trained on one stage alone (method finetune), with
    ``train.seed = seed`` when given; a finished run of the same recipe in ``run_dir`` is read,
    not trained again (another recipe's is replaced)."""
    from mil_plugins.engine.resume import finished_run
    from mil_plugins.engine.run import Runner

    r = copy.deepcopy(recipe)
    if seed is not None:
        r["train"]["seed"] = int(seed)
    r["stages"] = [s for s in r["stages"] if s["name"] == stage_name]
    r["methods"] = [{"name": "finetune", "options": {}}]
    r["eval"]["unseen"] = False
    r["eval"]["baseline"] = False
    out = run_dir / f"alone-{stage_name}"
    r["output"]["dir"] = str(out)
    done, changed = finished_run(out, r)
    if done:  # the same one-stage run finished before (another table, an interrupted bench)
        print(f"[probe-gap] {out}: done before with this recipe, not re-run", flush=True)
        return json.loads((out / "metrics.json").read_text())["per_task"][stage_name]
    if changed:
        print(f"[probe-gap] {out}: finished, but {changed}; running it again", flush=True)
    metrics = Runner(r, overwrite=True).run()
    return metrics["per_task"][stage_name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value recipe overrides")
    parser.add_argument("--stages", help="comma-separated stage names (default: all)")
    parser.add_argument("--no-mllm", action="store_true", help="probes only, no training")
    parser.add_argument("--seeds", type=int, default=None, help="train the MLLM alone with "
                        "train.seed 0..N-1 and show mean ± std (default: the recipe's seed, once)")
    parser.add_argument("--run-dir", default=None, help="where the one-stage runs go "
                        "(default: <recipe output.dir>-probe-gap)")
    parser.add_argument("--out", help="write the markdown table here")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    torch.set_num_threads(int(recipe["train"]["num_threads"] or torch.get_num_threads()))
    gen = recipe["data"]["generate"]
    if gen is not None:
        from mil_plugins.benchmark import make_benchmark
        make_benchmark(Path(recipe["data"]["root"]), size=gen["size"], seed=gen["seed"])
    from mil_plugins.engine.encoder_pretraining import apply_encoder_pretraining
    apply_encoder_pretraining(recipe)
    names = args.stages.split(",") if args.stages else None
    t0 = time.time()
    result = {"recipe": args.recipe, "overrides": args.overrides,
              "stages": probe_stages(recipe, names, recipe["train"]["seed"])}
    if not args.no_mllm:
        run_dir = Path(args.run_dir or (recipe["output"]["dir"].rstrip("/") + "-probe-gap"))
        seeds = list(range(args.seeds)) if args.seeds else [None]
        for stage, tasks in result["stages"].items():
            per_seed = [train_alone(recipe, stage, run_dir if s is None else run_dir / f"seed-{s}", s)
                        for s in seeds]
            for task, v in tasks.items():
                if seeds == [None]:
                    v["mllm"] = per_seed[0].get(task)
                    continue
                values = [scores.get(task) for scores in per_seed]
                summary = summarize(values)
                v.update(mllm=summary["mean"], mllm_std=summary["std"], mllm_seeds=values)
        if args.seeds:
            result["seeds"] = seeds
    result["seconds"] = round(time.time() - t0, 1)
    result["command"] = " ".join(["python bench/probe_gap.py"] + (argv if argv is not None else sys.argv[1:]))
    text = render_probe_gap(result)
    print(text)
    if args.out:
        from mil_plugins.atomic import atomic_write_text
        atomic_write_text(args.out, text)
    if args.json:
        from mil_plugins.atomic import atomic_write_json
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

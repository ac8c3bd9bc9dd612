"""Seeds and intervals: the statistics, the multi-seed comparison, results blocks in the docs,
per-cell standard errors, and the linear probes behind bench/probe_gap.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mil_plugins import compare, stats
from mil_plugins.evaluate import score_predictions

ROOT = Path(__file__).resolve().parents[1]


def test_summarize_mean_std_and_t_interval():
    s = stats.summarize([40.0, 44.0, 48.0])
    assert s["mean"] == pytest.approx(44.0) and s["std"] == pytest.approx(4.0)
    half = 4.302652729911275 * 4.0 / math.sqrt(3)  # t(0.975, df=2)
    assert s["ci95"] == pytest.approx([44.0 - half, 44.0 + half])
    one = stats.summarize([5.0, None])
    assert one["n"] == 1 and one["std"] is None and one["ci95"] is None


def test_paired_differences_remove_the_shared_seed_effect():
    a, b = [50.0, 60.0, 70.0], [40.0, 50.0, 60.0]  # b is a minus 10 at every seed
    p = stats.paired(a, b)
    assert p["mean"] == pytest.approx(10.0) and p["std"] == pytest.approx(0.0)
    assert p["ci95"] == pytest.approx([10.0, 10.0])


def test_standard_errors_binomial_and_bootstrap():
    rows = [{"task": "t", "metric": "exact_match", "prediction": "a" if i < 30 else "b",
             "answer": "a"} for i in range(100)]
    rows += [{"task": "c", "metric": "bleu4", "prediction": "a red circle" if i % 2 else "a blue square",
              "answer": "a red circle"} for i in range(60)]
    scored = score_predictions(rows)
    assert scored["task_se"]["t"] == pytest.approx(100 * math.sqrt(0.3 * 0.7 / 100))
    assert 0 < scored["task_se"]["c"] < 20
    assert scored["se"] == pytest.approx(math.sqrt(scored["task_se"]["t"] ** 2
                                                   + scored["task_se"]["c"] ** 2) / 2)
    again = score_predictions(rows)  # the bootstrap is seeded: the same rows, the same SE
    assert again["task_se"]["c"] == scored["task_se"]["c"]


def _fake_run(d: Path, seed: int, R, per_task, method: str):
    d.mkdir(parents=True)
    from mil_plugins.metrics import compute_all
    m = {"method": method, "stages": ["image", "audio"], "modalities": ["image", "audio"],
         "accuracy_matrix": R, "per_task": per_task, "trainable_parameters": [10, 20],
         "seconds": [1.0, 2.0], "accuracy_se": [[1.5, None], [1.2, 2.1]], "completed_stages": 2}
    m.update(compute_all(R, None))
    (d / "metrics.json").write_text(json.dumps(m))
    return d


@pytest.fixture
def two_methods(tmp_path):
    groups = {"finetune": [], "joint": []}
    for seed in range(3):
        ft = [[60.0 + seed, None], [30.0 + seed, 70.0]]
        jt = [[60.0 + seed, None], [58.0 + seed, 71.0]]
        task = {"image": {"color": 50.0 + seed}, "audio": {"pitch": 90.0}}
        groups["finetune"].append(_fake_run(tmp_path / "finetune" / f"seed-{seed}", seed, ft, task, "finetune"))
        groups["joint"].append(_fake_run(tmp_path / "joint" / f"seed-{seed}", seed, jt, task, "joint"))
    return groups


def test_aggregate_and_render(two_methods):
    result = compare.aggregate(two_methods, "finetune", "python tools/compare.py ...")
    g = result["groups"]["joint"]
    assert g["seeds"] == [0, 1, 2]
    assert g["metrics"]["final_average_accuracy"]["mean"] == pytest.approx((59 + 71) / 2)
    # finetune forgets 30 points of image at every seed, joint 2: paired difference exactly -28
    assert g["paired"]["forgetting"]["mean"] == pytest.approx(-28.0)
    assert g["paired"]["forgetting"]["std"] == pytest.approx(0.0)
    assert "paired" not in result["groups"]["finetune"]
    assert result["chance"]["image"]["color"] == pytest.approx(100 / 3)
    assert g["max_cell_se"] == pytest.approx(2.1)
    text = compare.render(result)
    assert "| joint | 3 | 65.0" in text and "Paired differences to `finetune`" in text
    assert "| image | color | 33.3 |" in text


def test_doc_blocks_are_rendered_from_results_and_checked(two_methods, tmp_path):
    result = compare.aggregate(two_methods, "finetune", "cmd")
    (tmp_path / "r.json").write_text(json.dumps(result))
    doc = tmp_path / "doc.md"
    doc.write_text("# Results\n<!-- results: r.json -->\nstale numbers\n<!-- /results -->\n"
                   "<!-- results: r.json tasks -->\n<!-- /results -->\n")
    assert len(compare.check_doc(doc, tmp_path)) == 2
    assert compare.update_doc(doc, tmp_path) == 2
    assert compare.check_doc(doc, tmp_path) == []
    assert "stale numbers" not in doc.read_text()
    result["groups"]["joint"]["metrics"]["forgetting"]["mean"] = -99.0  # the file changes...
    (tmp_path / "r.json").write_text(json.dumps(result))
    assert compare.check_doc(doc, tmp_path)  # ...and the doc no longer agrees


def test_every_number_block_in_the_docs_matches_its_results_file():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = 0
    for doc in docs:
        assert compare.check_doc(doc, ROOT) == [], doc
        blocks += len(compare.BLOCK.findall(doc.read_text(encoding="utf-8")))
    assert blocks >= 3  # README's summary, docs/results.md, docs/probe-gap.md


def test_compare_cli_tabulates_existing_runs(two_methods, tmp_path):
    runs = [str(p) for ps in two_methods.values() for p in ps]
    out = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compare.py"), "--runs", *runs,
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(out.read_text())["groups"]) == {"finetune", "joint"}


def test_compare_splits_per_recipe_overrides():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import compare as cli  # tools/compare.py
    finally:
        sys.path.pop(0)
    assert cli.split_recipes(["a.yaml", "train.lr=1", "b.yaml", "c.yml", "x=2"]) == [
        ("a.yaml", ["train.lr=1"]), ("b.yaml", []), ("c.yml", ["x=2"])]


# ---- probes ---------------------------------------------------------------------------------------

class _S:
    def __init__(self, i, task, answer, metric="exact_match"):
        self.id, self.task, self.metric = f"s{i}", task, metric
        self.conversations = [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]


def test_linear_probe_reads_a_linearly_coded_attribute_and_not_noise():
    import torch
    from mil_plugins.probe import probe_tasks

    rng = np.random.default_rng(0)
    def data(n, offset):
        pairs = []
        for i in range(n):
            y = ["red", "green", "blue"][i % 3]
            x = rng.normal(size=16)
            x[i % 3] += 4.0  # the attribute lives in one direction
            pairs.append((_S(offset + i, "color", y), torch.tensor(x, dtype=torch.float32)))
            noise = torch.tensor(rng.normal(size=16), dtype=torch.float32)
            pairs.append((_S(offset + i, "noise", ["a", "b"][int(rng.integers(2))]), noise))
        return pairs
    scores = probe_tasks(data(90, 0), data(60, 1000))
    assert scores["color"] >= 95.0
    assert scores["noise"] < 75.0


def test_probe_gap_renders_its_results_file():
    from mil_plugins.probe import render_probe_gap

    result = {"stages": {"audio": {"pitch": {"chance": 50.0, "raw": 90.0, "encoder": 100.0,
                                              "mllm": 95.0}}}, "command": "python bench/probe_gap.py x"}
    text = render_probe_gap(result)
    assert "| audio | pitch | 50.0 | 90.0 | 100.0 | 95.0 | 0.95 |" in text
    # over seeds: mean ± std, the ratio of the mean, and how many seeds reach 0.9 of the probe
    result["seeds"] = [0, 1, 2]
    result["stages"]["audio"]["pitch"].update(mllm=90.0, mllm_std=5.0, mllm_seeds=[85.0, 90.0, 95.0])
    text = render_probe_gap(result)
    assert "| audio | pitch | 50.0 | 90.0 | 100.0 | 90.0 ± 5.0 | 0.90 | 2/3 |" in text


@pytest.mark.slow
def test_probe_gap_bench_trains_the_mllm_alone_once_per_seed(tmp_path):
    """bench/probe_gap.py --seeds 2 at tiny scale: one run folder per seed, mean ± std in the
    results file, and a table with the seeds column."""
    from _tiny_run import tiny_args

    out = tmp_path / "run"
    args = tiny_args(tmp_path / "data", out, stages=1)
    rc = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_gap.py"), *args,
                         "--seeds", "2", "--json", str(tmp_path / "gap.json"),
                         "--out", str(tmp_path / "gap.md")], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
    assert rc.returncode == 0, rc.stderr[-3000:]
    result = json.loads((tmp_path / "gap.json").read_text())
    assert result["seeds"] == [0, 1]
    (stage, tasks), = result["stages"].items()
    for v in tasks.values():
        assert len(v["mllm_seeds"]) == 2
        assert v["mllm"] == pytest.approx(float(np.mean(v["mllm_seeds"])))
    for seed in (0, 1):
        metrics = json.loads((tmp_path / "run-probe-gap" / f"seed-{seed}" / f"alone-{stage}" /
                              "metrics.json").read_text())
        assert metrics["completed_stages"] == 1
    assert "seeds >= 0.9" in (tmp_path / "gap.md").read_text()
    # run again: the finished one-stage runs of the same recipe are read back, not trained again
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_gap.py"), *args,
                            "--seeds", "2", "--json", str(tmp_path / "gap2.json")], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before with this recipe, not re-run") == 2
    reread = json.loads((tmp_path / "gap2.json").read_text())
    assert reread["stages"] == result["stages"]


@pytest.mark.slow
def test_fresh_run_times_a_recipe_from_nothing(tmp_path):
    """bench/fresh_run.py at tiny scale: everything generated into a temporary folder (no data or
    encoders found from before), the split of the time recorded, and the docs view renders it."""
    from _tiny_run import tiny_args

    from mil_plugins.compare import render_view

    args = [a for a in tiny_args(tmp_path / "unused", tmp_path / "unused-run", stages=1)
            if a != "encoder_pretraining=null"]
    args += ["encoder_pretraining.data.generate.size=tiny", "encoder_pretraining.steps=2",
             "encoder_pretraining.steps_by_modality={}", "encoder_pretraining.workers=1"]
    out = tmp_path / "fresh.json"
    rc = subprocess.run([sys.executable, str(ROOT / "bench" / "fresh_run.py"), *args, "--json",
                         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rc.returncode == 0, rc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["encoder_pretraining_seconds"]) == {"image"}  # pretrained here, not found
    assert len(result["stage_seconds"]) == 1 and result["wall_seconds"] > sum(result["stage_seconds"])
    assert not (tmp_path / "unused").exists() and not (tmp_path / "unused-run").exists()
    text = render_view(result, "fresh_run")
    assert text.startswith(f"A fresh run of `{args[0]}`") and "Produced by: `python bench/fresh_run.py" in text

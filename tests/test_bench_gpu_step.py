"""bench/gpu_step.py at the tiny shape on CPU: both regimes, both sides, our real train_stage path.

Behaviour only (timings on a shared CPU mean nothing): every (regime, side) row is there with a
positive throughput, the two sides train the same number of parameters of the same model, the
ratios are computed, and the JSON file is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_step_tiny_runs_both_regimes_on_both_sides(tmp_path):
    out = tmp_path / "gpu_step.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--shape", "tiny",
                           "--steps", "1", "--warmup", "1", "--device", "cpu", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(out.read_text())
    assert info["shape"] == "tiny" and info["device"] == "cpu" and info["gpu"] is None
    rows = {(r["regime"], r["side"]): r for r in info["rows"]}
    assert set(rows) == {(reg, side) for reg in ("projector_only", "lora_projector")
                         for side in ("ours", "anchor")}
    for (regime, side), row in rows.items():
        assert row["tokens_per_s"] > 0, (regime, side)
        assert row["seq"] == 16 + 32 and row["batch"] == 2
        assert row["mfu"] is None and row["peak_mem_gib"] is None  # no GPU: n/a, not invented
    for regime in ("projector_only", "lora_projector"):
        ours, anchor = rows[(regime, "ours")], rows[(regime, "anchor")]
        # the same model on both sides: same parameter counts, same trainable set size
        assert ours["total"] == anchor["total"] and ours["trainable"] == anchor["trainable"]
        ratio = info["ratios"][regime]
        assert ratio["tokens_per_s"] == round(ours["tokens_per_s"] / anchor["tokens_per_s"], 3)
        assert ratio["peak_mem"] is None and ratio["meets_targets"] is None
    assert rows[("lora_projector", "ours")]["trainable"] > rows[("projector_only", "ours")]["trainable"]
    # the printed table names every row and the ratios
    assert proc.stdout.count("ours/anchor tokens/s") == 2
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 4


def test_gpu_step_shapes_match_the_anchor_table():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_step
    finally:
        sys.path.remove(str(ROOT / "bench"))
    big = gpu_step.SHAPES["llava7b"]
    assert (big.batch, big.seq, big.image_tokens, big.lora_r) == (4, 1088, 576, 128)
    assert big.llm["hidden_size"] == 4096 and big.llm["num_hidden_layers"] == 32
    assert big.vision["hidden_size"] == 1024 and big.vision["num_hidden_layers"] == 24
    tok = gpu_step.make_tokenizer(1000)
    assert len(tok) == 1000 and tok.convert_tokens_to_ids("<image>") == 4

"""bench/gpu_check.py in its CPU dry run: the prepared GPU script keeps working between GPU sessions.

The first test (slow: four short training runs) runs the plain-process checks (bf16 autocast,
mid-stage resume against an uninterrupted run, the tiny throughput bench) through the script's own
CLI; the last (slower) runs the DeepSpeed checks (ZeRO-2, ZeRO-3, lwf + ewc under ZeRO-3) through
the launcher on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _shared import benchmark, torch_extensions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data():
    return benchmark("tiny", seed=0)  # shared, read-only (the script reads it, writes elsewhere)


def dry_run(tiny_data: Path, out: Path, only: str, timeout: int) -> dict:
    env = dict(os.environ)
    if "zero" in only:  # DeepSpeed's CPU allreduce op, built once for every launch of the run
        env["TORCH_EXTENSIONS_DIR"] = torch_extensions()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-dry-run",
                           "--out", str(out), "--data", str(tiny_data), "--only", only,
                           "--timeout", str(timeout)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3 * timeout, env=env)
    doc = json.loads((out / "gpu_check.json").read_text())
    assert proc.returncode == 0, (doc, (out / "gpu_check.log").read_text()[-4000:])
    assert doc["mode"] == "cpu-dry-run" and doc["passed"] is True
    return {r["check"]: r for r in doc["checks"]}


@pytest.mark.slow
def test_cpu_dry_run_plain_checks(tiny_data, tmp_path):
    checks = dry_run(tiny_data, tmp_path / "out", "env,bf16_autocast,resume_mid_stage,gpu_step", 300)
    assert list(checks) == ["env", "bf16_autocast", "resume_mid_stage", "gpu_step"]
    assert all(c["passed"] for c in checks.values())
    assert checks["env"]["cuda"] is False and checks["env"]["gpu"] is None  # no GPU claimed
    bf16 = checks["bf16_autocast"]
    assert bf16["completed_stages"] == 2 and bf16["losses_finite"] and bf16["logged_losses"] > 0
    resume = checks["resume_mid_stage"]
    assert resume["rc_killed"] == 137 and resume["killed_at"] == ["depth", 4]
    assert resume["weights_exact"] is True and resume["weights_max_abs_diff"] == 0.0
    step = checks["gpu_step"]
    assert {(r["regime"], r["side"]) for r in step["rows"]} == {
        (g, s) for g in ("projector_only", "lora_projector") for s in ("ours", "anchor")}
    assert all(r["tokens_per_s"] > 0 for r in step["rows"])
    assert json.loads((tmp_path / "out" / "gpu_step.json").read_text())["shape"] == "tiny"
    assert "tools/train.py" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_a_failing_check_is_reported_not_hidden(tiny_data, tmp_path):
    """A broken run (here: an unknown method) fails its check, and the script exits non-zero."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    out = tmp_path / "out"
    out.mkdir()
    checker = gpu_check.Checker(out, tiny_data, True, 300, tmp_path / "work")
    checker.run_check("bad", "methods=[{name: no_such_method}]")
    assert checker.records[-1]["passed"] is False and checker.records[-1]["rc"] != 0
    assert json.loads((out / "gpu_check.json").read_text())["passed"] is False


@pytest.mark.slow
def test_cpu_dry_run_zero2(tiny_data, tmp_path):
    pytest.importorskip("deepspeed")
    zero2 = dry_run(tiny_data, tmp_path / "out", "zero2", 600)["zero2"]
    assert zero2["passed"] and zero2["completed_stages"] == 2 and zero2["losses_finite"]
    assert zero2["nccl_seen"] is False  # CPU: gloo, never NCCL


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="ZeRO-3 leaves parameters partitioned after a stage: "
                   "evaluation (generate outside the engine), EWC's Fisher and the checkpoint "
                   "read empty tensors; flips to a pass once the engine gathers them")
@pytest.mark.parametrize("check", ["zero3", pytest.param("zero3_lwf_ewc", marks=pytest.mark.extended)])
def test_cpu_dry_run_zero3(check, tiny_data, tmp_path):
    pytest.importorskip("deepspeed")
    result = dry_run(tiny_data, tmp_path / "out", check, 600)[check]
    assert result["passed"] and result["completed_stages"] == 2

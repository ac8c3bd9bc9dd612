"""docs/llava_fork_audio_stage.py, the runnable example of docs/llava-forks.md, at tiny scale: a
LLaVA fork (LLaVA's own LlavaLlamaForCausalLM) trains an audio stage with our audio plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_the_llava_fork_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "llava_fork_audio_stage.py"),
                           "--out", str(tmp_path), "--steps", "6", "--eval", "4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["loss_last"] < summary["loss_first"]
    assert summary["trained"] == "projector+llm" and summary["image_answers"] == 4
    assert summary["reload_gives_same_answers"] is True     # save_fork -> LLaVA's from_pretrained
    assert summary["adopted_modalities"] == ["image", "audio"]
    assert 0.0 <= summary["audio_accuracy"] <= 1.0
    assert (tmp_path / "checkpoint" / "modalities" / "audio" / "mm_projector.bin").is_file()

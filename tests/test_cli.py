"""The `mil` console script's sub-commands, run as a user would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

MIL = [sys.executable, "-m", "mil_plugins.cli"]


def mil(*args, check=True):
    return subprocess.run([*MIL, *args], capture_output=True, text=True, check=check)


def test_console_script_is_installed():
    assert shutil.which("mil", path=str(Path(sys.executable).parent))


def test_make_benchmark_then_check_data(tmp_path):
    out = tmp_path / "bench"
    text = mil("make-benchmark", str(out), "--size", "tiny", "--seed", "3").stdout
    assert "image  train 48, test 24" in text and "generated" in text
    assert json.loads((out / "benchmark.json").read_text())["seed"] == 3
    assert "already there" in mil("make-benchmark", str(out), "--size", "tiny", "--seed", "3").stdout

    ok = mil("check-data", str(out / "audio" / "test.json"), "--root", str(out), "--workers", "2")
    assert ok.returncode == 0 and "24 samples, 0 bad" in ok.stdout

    manifest = out / "audio" / "test.json"
    rows = json.loads(manifest.read_text())
    (out / rows[0]["audio"]).write_bytes(b"RIFF....not a wav")
    bad = mil("check-data", str(manifest), "--root", str(out), check=False)
    assert bad.returncode == 1
    assert rows[0]["id"] in bad.stdout and "24 samples, 1 bad" in bad.stdout


def test_user_errors_are_one_clear_line_not_a_traceback():
    root = Path(__file__).resolve().parents[1]
    bad = mil("train", str(root / "recipes" / "quickstart.yaml"), "train.lrr=1", check=False)
    assert bad.returncode == 2
    assert "at train.lrr: unknown key (did you mean 'lr'?)" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = mil("eval", "/nonexistent/ckpt", "m.json", check=False)
    assert missing.returncode == 2 and "not a mil-plugins checkpoint" in missing.stderr

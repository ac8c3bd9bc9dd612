"""The example third-party package in docs/example-plugin: install it, see it, train with it.

It is installed with pip into a private target folder (not into the test environment itself), and
the commands run with that folder on PYTHONPATH, exactly as if the package had been pip-installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "example-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "example-plugin"
    shutil.copytree(EXAMPLE, source)  # building in place would leave build/ in the checkout
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    env["MIL_NUM_THREADS"] = "1"
    return env


def test_installed_plugin_appears_in_the_registry(installed):
    out = subprocess.run([sys.executable, "-m", "mil_plugins.cli", "plugins", "--json"],
                         env=installed, capture_output=True, text=True, check=True).stdout
    rows = {(r["kind"], r["name"]): r for r in json.loads(out)}
    thermal = rows[("modality", "thermal")]
    assert thermal["distribution"] == "mil-example-thermal" and thermal["version"] == "0.1.0"
    assert thermal["status"] == "loaded" and thermal["error"] is None
    assert rows[("modality", "image")]["distribution"] == "mil-plugins"


def test_a_broken_plugin_is_listed_and_the_rest_still_work(tmp_path, installed):
    broken = tmp_path / "broken"
    (broken / "mil_broken_modality-1.0.dist-info").mkdir(parents=True)
    (broken / "mil_broken_modality-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mil-broken-modality\nVersion: 1.0\n")
    (broken / "mil_broken_modality-1.0.dist-info" / "entry_points.txt").write_text(
        "[mil_plugins.modalities]\nsonar = mil_broken_modality_missing:Sonar\n"
        "image = mil_broken_modality_missing:Image\n")
    env = dict(installed)
    env["PYTHONPATH"] = os.pathsep.join([str(broken), env["PYTHONPATH"]])
    out = subprocess.run([sys.executable, "-m", "mil_plugins.cli", "plugins", "--json"],
                         env=env, capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    sonar = next(r for r in rows if r["name"] == "sonar")
    assert sonar["status"] == "failed" and "No module named" in sonar["error"]
    assert sonar["distribution"] == "mil-broken-modality" and sonar["version"] == "1.0"
    images = [r for r in rows if r["name"] == "image"]
    assert len(images) == 2 and all("duplicate" in r["error"] for r in images)
    thermal = next(r for r in rows if r["name"] == "thermal")
    assert thermal["status"] == "loaded"
    text = subprocess.run([sys.executable, "-m", "mil_plugins.cli", "plugins"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert "failed to load" in text and "mil_broken_modality_missing:Sonar" in text


@pytest.mark.slow
def test_train_a_stage_with_the_third_party_modality(tmp_path, installed):
    data = tmp_path / "data"
    (data / "thermal").mkdir(parents=True)
    rng = np.random.default_rng(0)
    samples = {"train": [], "test": []}
    for split, n in (("train", 24), ("test", 8)):
        for i in range(n):
            hot = i % 2 == 0
            grid = rng.normal(300.0, 2.0, size=(16, 16))
            grid[4:12, 4:12] += 40.0 if hot else -40.0
            rel = f"thermal/{split}_{i}.npy"
            np.save(data / rel, grid)
            samples[split].append({
                "id": f"{split}-{i}", "thermal": rel, "task": "temperature", "metric": "exact_match",
                "conversations": [
                    {"from": "human", "value": "<thermal>\nIs the centre hot or cold?"},
                    {"from": "gpt", "value": "hot" if hot else "cold"}]})
    for split, rows in samples.items():
        (data / "thermal" / f"{split}.json").write_text(json.dumps(rows))
    recipe = tmp_path / "thermal.yaml"
    recipe.write_text(f"""# Run: python tools/train.py thermal.yaml
model:
  llm: {{config: {{model_type: llama, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
                  num_key_value_heads: 2, intermediate_size: 64, max_position_embeddings: 128}}}}
  tokenizer: {{build_from_data: true}}
  template: qa
  max_length: 64
modalities: {{thermal: {{}}}}
data: {{root: {data}}}
stages: [{{name: thermal, modality: thermal, train: thermal/train.json, test: thermal/test.json}}]
train: {{batch_size: 8, max_steps: 3, lr: 1.0e-3, trainable: [connector]}}
output: {{dir: {tmp_path / 'out'}, tensorboard: false}}
""")
    subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), str(recipe)], env=installed,
                   cwd=ROOT, check=True, capture_output=True, text=True)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["modalities"] == ["thermal"] and len(metrics["accuracy_matrix"]) == 1
    assert metrics["accuracy_matrix"][0][0] is not None

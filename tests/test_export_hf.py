"""`mil export --to hf`: a run whose image tower is a transformers CLIP (a checkpoint, or the
quickstart's tiny one built from config) exports to a directory that
`LlavaForConditionalGeneration.from_pretrained` loads, with the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_export_to_transformers_llava_gives_equal_logits(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration

    from mil_plugins.benchmark import make_benchmark
    from mil_plugins.engine.loading import load_for_eval

    torch.manual_seed(0)
    clip_dir = tmp_path / "tiny-clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)
                    ).save_pretrained(str(clip_dir))
    data = tmp_path / "bench"
    make_benchmark(data, size="tiny", seed=0, modalities=["image"])
    out = tmp_path / "run"
    env = {**os.environ, "MIL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"),
                    str(ROOT / "recipes" / "quickstart.yaml"), f"data.root={data}",
                    "data.generate.size=tiny", f"output.dir={out}", "output.tensorboard=false",
                    "encoder_pretraining=null",
                    "modalities={image: {pretrained: %s, image_size: 32, select_layer: -2}}" % clip_dir,
                    "stages=[{name: image, modality: image, train: image/train.json, test: image/test.json}]",
                    "warmup=null", "train.max_steps=3"],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    ckpt = out / "checkpoints" / "stage-01-image"
    export = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "mil_plugins.cli", "export", str(ckpt), "--to", "hf",
                    str(export)], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert json.loads((export / "config.json").read_text())["model_type"] == "llava"

    llava = LlavaForConditionalGeneration.from_pretrained(str(export)).eval()
    session = load_for_eval(ckpt)
    sample = session.load_samples(data / "image" / "test.json", data)[0]
    batch = next(session.make_loader([sample], mode="train", batch_size=1))
    pixels = session.session.plugins["image"].preprocess(sample.media["image"][0])[None]
    with torch.no_grad():
        ours = session.model(batch).logits
        theirs = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=pixels).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def _logits_ours_and_theirs(ckpt: Path, export: Path, data: Path):
    from transformers import LlavaForConditionalGeneration

    from mil_plugins.engine.loading import load_for_eval

    llava = LlavaForConditionalGeneration.from_pretrained(str(export)).eval()
    session = load_for_eval(ckpt)
    sample = session.load_samples(data / "image" / "test.json", data)[0]
    batch = next(session.make_loader([sample], mode="train", batch_size=1))
    pixels = session.session.plugins["image"].preprocess(sample.media["image"][0])[None]
    with torch.no_grad():
        ours = session.model(batch).logits
        theirs = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=pixels).logits
    return ours, theirs


def test_quickstart_final_checkpoint_exports_to_transformers_llava(tmp_path):
    """The quickstart recipe as it is (all five stages, a few steps each) -> its last checkpoint
    -> `mil export --to hf` -> LlavaForConditionalGeneration gives our logits for an image prompt."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny_run import tiny_args

    from _shared import benchmark

    data, out = benchmark("tiny", seed=0), tmp_path / "run"  # shared, read-only
    env = {**os.environ, "MIL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), *tiny_args(data, out, stages=5)],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    ckpt = out / "checkpoints" / "stage-05-point"
    export = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "mil_plugins.cli", "export", str(ckpt), "--to", "hf",
                    str(export)], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_config"]["model_type"] == "clip_vision_model"
    # the other modalities ride beside it, with their token mixers
    assert (export / "modalities" / "video" / "mm_input_layer.safetensors").is_file()
    ours, theirs = _logits_ours_and_theirs(ckpt, export, data)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()

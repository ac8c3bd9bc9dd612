"""A two-stage cut of recipes/quickstart.yaml that trains a few steps (seconds): the run the
reliability tests kill, resume, lock and tamper with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def tiny_args(data_root: Path, out: Path, *extra: str, stages: int = 2) -> list[str]:
    recipe = yaml.safe_load(RECIPE.read_text())
    cut = recipe["stages"][:stages]
    modalities = {s["modality"]: recipe["modalities"].get(s["modality"]) or {}
                  for s in cut if s.get("modality")}
    return [str(RECIPE), f"data.root={data_root}", f"output.dir={out}",
            "data.generate.size=tiny", "output.tensorboard=false", "encoder_pretraining=null",
            f"modalities={json.dumps(modalities)}", f"stages={json.dumps(cut)}",
            "warmup.max_steps=2", "train.max_steps=2", "data.max_train_samples=8",
            "data.max_test_samples=4", "eval.batch_size=8", "train.num_threads=1", *extra]


def adopt_llava_command(data_root: Path, model_dir: Path, out: Path) -> list[str]:
    """``tools/train.py`` on the quickstart recipe adopting a LLaVA checkpoint (``model.llm:
    {llava: DIR}``, LLaVA's per-modality ``mlp2x_gelu`` projectors, its own tokenizer) and adding
    audio after image, two steps a stage."""
    return [sys.executable, str(ROOT / "tools" / "train.py"), str(RECIPE),
            f"data.root={data_root}", "data.generate=null", "encoder_pretraining=null",
            f"output.dir={out}", "output.tensorboard=false",
            f"model.llm={{llava: {model_dir}}}", "model.tokenizer={build_from_data: false}",
            "model.connector={mode: per_modality, projector_type: mlp2x_gelu}",
            "modalities={image: {}, audio: {}}", "warmup=null", "train.max_steps=2",
            "stages=[{name: image, modality: image, train: image/train.json, test: image/test.json},"
            " {name: audio, modality: audio, train: audio/train.json, test: audio/test.json}]"]

"""A recipe can start from a transformers LlavaForConditionalGeneration checkpoint (model.llm.llava):
its tower and projector become the image modality, new modalities are added beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tiny_run import adopt_llava_command

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mil_plugins.benchmark import make_benchmark
    from mil_plugins.data import build_word_tokenizer, get_template

    tmp = tmp_path_factory.mktemp("adopt")
    data = tmp / "bench"
    make_benchmark(data, size="tiny", seed=0, modalities=["image", "audio"])
    template = get_template("qa")
    texts = [template.literal_text]
    for m in ("image", "audio"):
        for split in ("train", "test"):
            for s in json.loads((data / m / f"{split}.json").read_text()):
                texts.append(template.text(s["conversations"], ["<image>", "<audio>"]))
    tok = build_word_tokenizer(texts, special_tokens=["<image>"])
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4,
                                vocab_size=len(tok), max_position_embeddings=256),
        image_token_index=tok.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu")
    model_dir = tmp / "tiny-llava-hf"
    LlavaForConditionalGeneration(config).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    return model_dir, data


def test_recipe_adopts_a_llava_checkpoint_and_adds_a_modality(tiny_llava, tmp_path):
    model_dir, data = tiny_llava
    out = tmp_path / "run"
    env = {**os.environ, "MIL_NUM_THREADS": "1"}
    proc = subprocess.run(
        adopt_llava_command(data, model_dir, out),
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"] == ["image", "audio"]
    assert all(v is not None for v in (metrics["accuracy_matrix"][1][0], metrics["accuracy_matrix"][1][1]))

    from mil_plugins.engine.loading import load_for_eval
    from transformers import LlavaForConditionalGeneration

    session = load_for_eval(out / "checkpoints" / "stage-02-audio")
    assert type(session.model.encoders["image"]).__name__ == "HFVisionTowerEncoder"
    # the image projector after training still maps onto Llava's layout
    export = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "mil_plugins.cli", "export",
                    str(out / "checkpoints" / "stage-02-audio"), "--to", "hf", str(export)],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    llava = LlavaForConditionalGeneration.from_pretrained(str(export))
    ours = session.model.connector.projectors["image"][0].weight
    assert torch.allclose(llava.model.multi_modal_projector.linear_1.weight, ours)

"""End to end with LLaVA's own classes: a LLaVA-original directory (LlavaLlamaForCausalLM +
CLIP tower) starts a recipe (model.llm.llava), an audio stage is added by our engine, and
``mil export --to llava-dir`` hands the result back to LLaVA's loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _llava_fixtures import save_tiny_clip_tower, tiny_llava_llama
from _tiny_run import adopt_llava_command

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_llava_dir_recipe_audio_stage_and_export_back(tmp_path):
    from mil_plugins.benchmark import make_benchmark
    from mil_plugins.data import build_word_tokenizer, get_template

    data = tmp_path / "bench"
    make_benchmark(data, size="tiny", seed=0, modalities=["image", "audio"])
    template = get_template("qa")
    texts = [template.literal_text] + [
        template.text(s["conversations"], ["<image>", "<audio>"])
        for m in ("image", "audio") for split in ("train", "test")
        for s in json.loads((data / m / f"{split}.json").read_text())]
    tok = build_word_tokenizer(texts)
    llava_dir = tmp_path / "llava-v1.5-tiny"
    model = tiny_llava_llama(tok, save_tiny_clip_tower(tmp_path / "tower"), hidden=64)
    model.save_pretrained(str(llava_dir))
    tok.save_pretrained(str(llava_dir))

    out = tmp_path / "run"
    env = {**os.environ, "MIL_NUM_THREADS": "1"}
    proc = subprocess.run(
        adopt_llava_command(data, llava_dir, out),
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "metrics.json").read_text())["stages"] == ["image", "audio"]

    export = tmp_path / "llava-export"
    subprocess.run([sys.executable, "-m", "mil_plugins.cli", "export",
                    str(out / "checkpoints" / "stage-02-audio"), "--to", "llava-dir", str(export)],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    from llava.model import LlavaLlamaForCausalLM

    from mil_plugins.engine.loading import load_for_eval
    from mil_plugins.integrations.llava_fork import (load_fork_modalities, placeholder_indices,
                                                     tokenizer_multimodal_token)

    fork, info = LlavaLlamaForCausalLM.from_pretrained(str(export), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    fork.get_vision_tower().load_model()
    load_fork_modalities(fork.eval(), export)
    ours = load_for_eval(out / "checkpoints" / "stage-02-audio").model
    g = torch.Generator().manual_seed(0)
    image, audio = torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 32, 100, generator=g)
    prompt = "Q: <image> and <audio> ? A:"
    ids = tokenizer_multimodal_token(prompt, ours.tokenizer, placeholder_indices(fork), "pt")[None]
    counts = {pid: n for pid, n in ours.placeholders().values()}
    expanded = [i for t in ours.tokenizer(prompt).input_ids for i in [t] * counts.get(t, 1)]
    with torch.no_grad():
        theirs = fork(input_ids=ids, images={"image": image, "audio": audio}).logits
        mine = ours({"input_ids": torch.tensor([expanded]), "media": {"image": image, "audio": audio}}).logits
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-5)

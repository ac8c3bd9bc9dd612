"""`mil export CKPT --to peft OUT`: the LoRA as a PEFT adapter directory that
`PeftModel.from_pretrained` loads and that gives the trained LLM's logits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from _tiny_run import tiny_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mil_plugins.benchmark import make_benchmark
    from mil_plugins.cli.train import main

    root = tmp_path_factory.mktemp("bench") / "mcl-tiny"
    make_benchmark(root, size="tiny", seed=0, modalities=["image"])
    out = tmp_path_factory.mktemp("runs") / "peft"
    threads = torch.get_num_threads()
    try:
        assert main(tiny_args(root, out, stages=1)) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "checkpoints" / "stage-01-image"


def test_peft_adapter_loads_and_matches_the_trained_llm(checkpoint, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from mil_plugins.cli import main as mil
    from mil_plugins.engine.loading import load_for_eval

    out = tmp_path / "adapter"
    assert mil(["export", str(checkpoint), "--to", "peft", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (out / "adapter_model.safetensors").is_file()
    assert config["base_model_name_or_path"] == str((out / "base_model").resolve())

    session = load_for_eval(checkpoint)
    ours = session.model.llm
    lora_weights = [p for n, p in ours.named_parameters() if "lora_B" in n]
    assert lora_weights and any(p.abs().sum() > 0 for p in lora_weights)  # trained, not the init

    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    base = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))
    theirs = PeftModel.from_pretrained(base, str(out)).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()   # base found from the config
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        assert torch.allclose(theirs(input_ids=ids).logits, expected, atol=1e-5)
        assert torch.allclose(auto(input_ids=ids).logits, expected, atol=1e-5)
        # and the LoRA matters: the bare base model gives other logits
        assert not torch.allclose(base.__class__.from_pretrained(str(out / "base_model"))(
            input_ids=ids).logits, expected, atol=1e-5)


def test_a_model_without_lora_is_refused(tmp_path):
    from mil_plugins.integrations.peft_adapter import export_peft

    with pytest.raises(ValueError, match="no LoRA"):
        export_peft(SimpleNamespace(is_peft=False), tmp_path / "x")
    with pytest.raises(ValueError, match="inside the LLM"):
        export_peft(SimpleNamespace(is_peft=True, layer_modules={"llm-adapter": None}), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

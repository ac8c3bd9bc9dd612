import json
import os

import pytest
import torch

from _model_fixtures import SeqPlugin, VecPlugin, make_batch, make_tokenizer, registered_fakes, tiny_cfg
from mil_plugins.model.build import build_model
from mil_plugins.model.io import load_model, save_model

VEC, SEQ = VecPlugin.name, SeqPlugin.name
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(autouse=True, scope="module")
def _fakes():
    with registered_fakes():
        yield


def _batch(m):
    g = torch.Generator().manual_seed(5)
    return make_batch(m, [("<vec> what is it ?", "cat", {VEC: [torch.randn(6, generator=g)]}),
                          ("<seq> say <vec>", "red", {SEQ: [torch.randn(3, 5, generator=g)],
                                                      VEC: [torch.randn(6, generator=g)]})])


def _perturb(m):
    """Give every weight (LoRA B included, which PEFT initialises to zero) a non-default value."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.mark.parametrize("mode,lora", [("shared", None), ("per_modality", LORA)])
def test_save_load_equal_logits(tmp_path, mode, lora):
    torch.manual_seed(0)
    tok = make_tokenizer()
    m = build_model(tiny_cfg(tok, mode, lora=lora, trainable_vec=True), tok)
    _perturb(m)
    m.eval()
    batch = _batch(m)
    with torch.no_grad():
        ref = m(batch).logits
    out = save_model(m, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    files = {p.name for p in out.iterdir()}
    assert {"mil_model.json", "tokenizer", "llm", "encoders.safetensors",
            "connector.safetensors"} <= files
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp siblings left
    assert (out / "llm" / "model.safetensors").is_file() and (out / "llm" / "config.json").is_file()
    meta = json.loads((out / "mil_model.json").read_text())
    assert meta["format_version"] == 1 and [e["name"] for e in meta["modalities"]] == [VEC, SEQ]
    assert meta["connector"]["mode"] == mode and meta["lora"] == lora

    if lora:
        adapter = out / "adapter"
        assert (adapter / "adapter_config.json").is_file()
        assert (adapter / "adapter_model.safetensors").is_file()
        acfg = json.loads((adapter / "adapter_config.json").read_text())
        assert acfg["peft_type"] == "LORA" and acfg["r"] == 4
        from safetensors.torch import load_file
        base_keys = load_file(str(out / "llm" / "model.safetensors")).keys()
        assert not any("lora" in k or "base_layer" in k for k in base_keys)
    else:
        assert "adapter" not in files

    loaded = load_model(out).eval()
    assert loaded.placeholders() == m.placeholders()
    assert loaded.connector.config() == m.connector.config()
    assert loaded.is_peft == bool(lora)
    with torch.no_grad():
        got = loaded(batch).logits
    assert torch.equal(got, ref)
    if lora:  # LoRA weights come back trainable, the base frozen
        names = [n for n, p in loaded.llm.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)


def test_save_replaces_existing_and_never_pickles(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tok = make_tokenizer()
    m = build_model(tiny_cfg(tok), tok).eval()
    save_model(m, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "stale.txt").write_text("old")
    save_model(m, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]

    import pickle

    def _no(*a, **k):
        raise AssertionError("load_model unpickled something")

    monkeypatch.setattr(pickle, "load", _no)
    monkeypatch.setattr(pickle, "loads", _no)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: real_load(*a, **{**k, "weights_only": True}))
    loaded = load_model(tmp_path / "ckpt").eval()
    batch = _batch(m)
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, m(batch).logits)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="mil_model.json"):
        load_model(tmp_path)

"""LLaVA-compatible projectors: names, layouts, conversions LLaVA <-> ours <-> transformers."""

from __future__ import annotations

import io
import types

import pytest
import torch
from torch import nn

from mil_plugins.projectors import build_projector, build_vision_projector
from mil_plugins.projectors import convert
from mil_plugins.registry import PluginError


def test_linear_layout():
    p = build_projector("linear", 8, 16)
    assert isinstance(p, nn.Linear) and p.in_features == 8 and p.out_features == 16
    assert set(p.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_mlp_gelu_layout_for_any_depth(depth):
    p = build_projector(f"mlp{depth}x_gelu", 8, 16)
    assert isinstance(p, nn.Sequential) and len(p) == 2 * depth - 1
    expected = set()
    for i in range(depth):
        expected |= {f"{2 * i}.weight", f"{2 * i}.bias"}
        if i:
            assert isinstance(p[2 * i - 1], nn.GELU)
    assert set(p.state_dict()) == expected
    assert p(torch.randn(2, 3, 8)).shape == (2, 3, 16)


def test_identity():
    p = build_projector("identity", 16, 16)
    x = torch.randn(2, 16)
    assert torch.equal(p(x), x) and p.config == {"mm_projector_type": "identity"}
    with pytest.raises(ValueError, match="identity"):
        build_projector("identity", 8, 16)


def test_unknown_projector_lists_registered():
    with pytest.raises(PluginError, match=r"unknown projector 'mlp2x_relu'.*linear"):
        build_projector("mlp2x_relu", 8, 16)


def test_build_vision_projector_drop_in_reads_any_config():
    cfg = types.SimpleNamespace(mm_projector_type="mlp2x_gelu", mm_hidden_size=8, hidden_size=16)
    assert len(build_vision_projector(cfg)) == 3
    assert isinstance(build_vision_projector({"mm_hidden_size": 8, "hidden_size": 16}), nn.Linear)


def test_projector_from_a_third_party_entry_point():
    from mil_plugins.plugins import PROJECTORS

    def tanh_proj(mm_hidden_size, hidden_size):
        return nn.Sequential(nn.Linear(mm_hidden_size, hidden_size), nn.Tanh())

    PROJECTORS.register("tanh_linear", tanh_proj)
    try:
        assert isinstance(build_projector("tanh_linear", 4, 6)[1], nn.Tanh)
    finally:
        PROJECTORS.unregister("tanh_linear")


@pytest.mark.parametrize("ptype", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_llava_mm_projector_bin_round_trip(tmp_path, ptype):
    torch.manual_seed(0)
    ours = build_projector(ptype, 8, 16)
    convert.save_llava_projector(tmp_path, ours.state_dict(), projector_type=ptype,
                                 mm_hidden_size=8, hidden_size=16)
    raw = torch.load(tmp_path / "mm_projector.bin", weights_only=True)
    if ptype == "linear":
        assert set(raw) == {"model.mm_projector.weight", "model.mm_projector.bias"}
    else:
        assert "model.mm_projector.0.weight" in raw and "model.mm_projector.2.bias" in raw
    cfg = convert.load_llava_config(tmp_path)
    assert cfg["mm_projector_type"] == ptype and cfg["mm_hidden_size"] == 8
    for name in ("mm_projector.bin", "mm_projector.safetensors"):
        back = build_vision_projector(cfg)
        back.load_state_dict(convert.load_projector_file(tmp_path / name))
        x = torch.randn(3, 8)
        assert torch.equal(back(x), ours(x))


def test_hf_llava_round_trip_equal_outputs():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        projector_hidden_act="gelu")
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf_state = {k: v for k, v in hf.state_dict().items() if "multi_modal_projector" in k}
    ours = build_projector("mlp2x_gelu", 8, 16)
    ours.load_state_dict(convert.from_hf_llava(hf_state))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.allclose(ours(x), hf.model.multi_modal_projector(x), atol=1e-6)
    # ours -> HF layout -> a fresh HF model gives the same outputs
    torch.manual_seed(1)
    fresh = LlavaForConditionalGeneration(cfg).eval()
    missing = fresh.load_state_dict(convert.to_hf_llava(ours.state_dict(), prefix="model.multi_modal_projector."),
                                    strict=False)
    assert not missing.unexpected_keys
    with torch.no_grad():
        assert torch.allclose(fresh.model.multi_modal_projector(x), ours(x), atol=1e-6)
    # and LLaVA keys in between: HF -> ours -> LLaVA bin -> ours
    buf = io.BytesIO()
    torch.save(convert.to_llava(ours.state_dict()), buf)
    buf.seek(0)
    again = build_projector("mlp2x_gelu", 8, 16)
    again.load_state_dict(convert.from_llava(torch.load(buf, weights_only=True)))
    assert torch.equal(again(x), ours(x))


def test_hf_layout_rejects_non_mlp2x():
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        convert.to_hf_llava(build_projector("linear", 4, 4).state_dict(), "linear")


def test_loading_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"model.mm_projector.weight": torch.zeros(2, 2), "x": types.SimpleNamespace(a=1)}, path)
    with pytest.raises(Exception):
        convert.load_projector_file(path)

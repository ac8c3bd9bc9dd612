"""The vision towers of the image, video and depth plugins (encoders/_towers.py): a tiny timm
VisionTransformer or a tiny transformers CLIP built from options, or any timm model id. Nothing is
downloaded: the network is refused in every test here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from encoders.depth import DepthPlugin
from encoders.image import ImagePlugin
from encoders.video import VideoPlugin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _timm_blocks(model, x, n_blocks):
    """What a timm ViT computes for the output of block ``n_blocks`` (no final norm), by hand."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for block in model.blocks[:n_blocks]:
        h = block(h)
    return h


def test_tiny_timm_tower_is_a_timm_vit_built_from_the_options():
    from timm.layers import build_sincos2d_pos_embed
    from timm.models.vision_transformer import VisionTransformer

    enc = ImagePlugin(hidden_size=32, layers=3, heads=2, patch_size=8, image_size=32).build_encoder()
    model = enc.tower.model
    assert isinstance(model, VisionTransformer)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (32, 3, 2)
    assert (enc.num_tokens, enc.hidden_size) == (16, 32)
    assert torch.equal(model.pos_embed[0], build_sincos2d_pos_embed([4, 4], 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x), _timm_blocks(model, x, 3)[:, 1:], atol=1e-6)  # CLS dropped
        first = ImagePlugin(hidden_size=32, layers=3, heads=2, select_layer=1,
                            select_feature="cls_patch").build_encoder()
        assert torch.allclose(first(x), _timm_blocks(first.tower.model, x, 1), atol=1e-6)
        embeddings = ImagePlugin(select_layer=0).build_encoder()
        assert torch.allclose(embeddings(x), _timm_blocks(embeddings.tower.model, x, 0)[:, 1:])
    with pytest.raises(ValueError, match="select_layer 3 out of range for 2 blocks"):
        ImagePlugin(select_layer=3).build_encoder()


def test_tiny_clip_tower_is_transformers_clip_built_from_the_options():
    from transformers import CLIPVisionModel

    enc = ImagePlugin(tiny_tower="clip").build_encoder()
    model = enc.tower.model
    assert isinstance(model, CLIPVisionModel)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.patch_size) == (64, 2, 8)
    assert (enc.num_tokens, enc.hidden_size) == (16, 64)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        states = model(pixel_values=x, output_hidden_states=True).hidden_states
        assert torch.equal(enc(x), states[-1][:, 1:])
        penultimate = ImagePlugin(tiny_tower="clip", select_layer=-2, select_feature="cls_patch")
        assert torch.equal(penultimate.build_encoder()(x), states[-2])  # same seed, same weights
    a, b = ImagePlugin(tiny_tower="clip").build_encoder(), ImagePlugin(tiny_tower="clip", init_seed=1).build_encoder()
    assert torch.equal(a(x), enc(x)) and not torch.equal(b(x), enc(x))


def test_a_timm_model_id_builds_its_architecture_and_selects_like_llava():
    enc = ImagePlugin(timm_model="test_vit", timm_pretrained=False, image_size=64).build_encoder()
    model = enc.tower.model
    assert model.default_cfg["architecture"] == "test_vit"
    assert (enc.num_tokens, enc.hidden_size) == (16, 64)  # 64 px / 16 px patches, no CLS
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # select_layer null on a timm id = -2, the penultimate block (LLaVA)
        assert torch.allclose(enc(x), _timm_blocks(model, x, len(model.blocks) - 1)[:, 1:], atol=1e-5)
    eva = ImagePlugin(timm_model="eva02_tiny_patch14_224", timm_pretrained=False, image_size=56,
                      select_feature="cls_patch").build_encoder()
    assert type(eva.tower.model).__name__ == "Eva"
    assert (eva.num_tokens, eva.hidden_size) == (17, 192)
    with torch.no_grad():
        assert eva(torch.randn(1, 3, 56, 56)).shape == (1, 17, 192)


def test_video_and_depth_take_timm_ids_and_the_tiny_towers():
    depth = DepthPlugin(timm_model="test_vit", timm_pretrained=False, image_size=64).build_encoder()
    assert depth.tower.in_chans == 2  # depth + mask: timm builds the patch embedding for 2 channels
    assert depth(torch.randn(1, 2, 64, 64)).shape == (1, 16, 64)
    video = VideoPlugin(timm_model="test_vit", timm_pretrained=False, image_size=64,
                        num_frames=2).build_encoder()
    assert video.num_tokens == 8 and video(torch.randn(1, 2, 3, 64, 64)).shape == (1, 8, 64)
    clip_depth = DepthPlugin(tiny_tower="clip").build_encoder()
    assert clip_depth(torch.randn(1, 2, 32, 32)).shape == (1, 16, 64)


def test_timm_id_recipes_validate_without_building_or_downloading(tmp_path, monkeypatch):
    import encoders._timm_tower as timm_tower
    from mil_plugins.recipe import RecipeError, load_recipe

    def no_build(*args, **kwargs):
        raise AssertionError("validation built a timm model")

    monkeypatch.setattr(timm_tower, "create_timm_model", no_build)
    shipped = load_recipe(ROOT / "recipes" / "llava" / "llava15_7b_mcl_eva_clip.yaml")
    for name in ("image", "video", "depth"):
        assert shipped["modalities"][name]["timm_model"] == "eva_giant_patch14_clip_224.laion400m"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
model: {llm: {config: {model_type: llama}}, tokenizer: {build_from_data: true}}
modalities:
  image: {timm_model: vit_large_patch14_clip_336.openai, image_size: 336}
  video: {timm_model: vit_so400m_patch14_siglip_384.webli, image_size: 384}
data: {root: data}
stages: [{name: image, modality: image, train: image/train.json, test: image/test.json}]
output: {dir: out}
""")
    assert load_recipe(recipe)["modalities"]["video"]["timm_model"] == "vit_so400m_patch14_siglip_384.webli"
    recipe.write_text(recipe.read_text().replace("siglip_384.webli", "siglip_384.nope"))
    with pytest.raises(RecipeError, match="modalities.video.*no pretrained tag 'nope'"):
        load_recipe(recipe)  # the id is checked against timm's registry, still without a download


@pytest.mark.parametrize("options, message", [
    ({"timm_model": "vit_larg_patch14_clip_336"}, "did you mean vit_large_patch14_clip_336"),
    ({"timm_model": "vit_large_patch14_clip_336.nope"}, "no pretrained tag 'nope'"),
    ({"timm_model": "test_vit", "pretrained": "openai/clip-vit-large-patch14"}, "not both"),
    ({"tiny_tower": "vit"}, "tiny_tower='vit' is not one of"),
])
def test_bad_tower_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as info:
        ImagePlugin(**options)
    assert "\n" not in str(info.value) and "'image'" in str(info.value)


def test_the_feature_cache_key_follows_the_tower_and_its_library(monkeypatch):
    import encoders._towers as towers

    timm_key = ImagePlugin().fingerprint()
    assert ImagePlugin(tiny_tower="clip").fingerprint() != timm_key
    real = towers.metadata.version
    monkeypatch.setattr(towers.metadata, "version",
                        lambda dist: "9.9.9" if dist == "timm" else real(dist))
    assert ImagePlugin().fingerprint() != timm_key  # an upgraded timm: features recomputed
    assert "timm-9.9.9" in VideoPlugin().version and "timm-9.9.9" in DepthPlugin().version


@pytest.mark.slow
def test_timm_and_clip_tower_features_feed_stages(tmp_path):
    """Image (tiny timm tower, per token) and video (tiny timm tower, token mixer) stages train
    from their features; the checkpoint rebuilds timm towers."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny_run import tiny_args
    from timm.models.vision_transformer import VisionTransformer

    from mil_plugins.benchmark import make_benchmark
    from mil_plugins.engine.loading import load_for_eval

    data, out = tmp_path / "bench", tmp_path / "run"
    make_benchmark(data, size="tiny", seed=0, modalities=["image", "video"])
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"),
                           *tiny_args(data, out, "modalities.image.tiny_tower=timm", stages=2)],
                          cwd=ROOT, env={**os.environ, "MIL_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"] == ["image", "video"] and metrics["accuracy_matrix"][1][1] is not None
    session = load_for_eval(out / "checkpoints" / "stage-02-video")
    for name in ("image", "video"):
        assert isinstance(session.model.encoders[name].tower.model, VisionTransformer)

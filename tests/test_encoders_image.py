"""The built-in image modality: Pillow files -> [3, S, S] -> ViT tokens (tiny and transformers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from encoder_checks import nearest_centroid_loo
import soundfile as sf
import torch
from PIL import Image, ImageDraw

from encoders._common import CLIP_MEAN, CLIP_STD
from encoders.image import ImagePlugin
from mil_plugins.modality import ModalityInputError
from mil_plugins.plugins import MODALITIES


def draw(path, kind="circle", color=(255, 0, 0), cx=32, cy=32, size=(64, 64), r=10):
    img = Image.new("RGB", size, (128, 128, 128))
    d = ImageDraw.Draw(img)
    box = [cx - r, cy - r, cx + r, cy + r]
    (d.ellipse if kind == "circle" else d.rectangle)(box, fill=color)
    img.save(path)
    return path


def test_registry_and_class_attributes():
    cls = MODALITIES.get("image")
    assert cls is ImagePlugin
    assert (cls.name, cls.key, cls.placeholder) == ("image", "image", "<image>")
    json.dumps(cls.default_options)
    assert cls.default_options["trainable"] is False


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")])
def test_round_trip_formats(tmp_path, fmt, suffix):
    path = tmp_path / f"red{suffix}"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(path, format=fmt, quality=95)
    x = ImagePlugin().preprocess(path)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x.mean((1, 2)), expected, atol=0.05)


def test_modes_and_aspect(tmp_path):
    # RGBA, grayscale, 16-bit grayscale and a wide image all give [3, S, S]
    Image.new("RGBA", (50, 20), (0, 255, 0, 128)).save(tmp_path / "rgba.png")
    Image.new("L", (20, 50), 200).save(tmp_path / "gray.png")
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(tmp_path / "g16.png")
    for name in ("rgba.png", "gray.png", "g16.png"):
        x = ImagePlugin(image_size=24, patch_size=8).preprocess(tmp_path / name)
        assert x.shape == (3, 24, 24)
        assert torch.isfinite(x).all()
    white = ImagePlugin().preprocess(tmp_path / "g16.png")   # 16-bit max is white, not clipped
    assert torch.allclose(white[:, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD),
                          atol=1e-4)
    # centre crop of a wide image: the left and right thirds are cut off
    img = np.zeros((32, 96, 3), np.uint8)
    img[:, 32:64] = 255
    Image.fromarray(img).save(tmp_path / "wide.png")
    x = ImagePlugin(mean=[0, 0, 0], std=[1, 1, 1]).preprocess(tmp_path / "wide.png")
    assert torch.allclose(x, torch.ones_like(x))


def test_determinism(tmp_path):
    path = draw(tmp_path / "a.png")
    p = ImagePlugin()
    assert torch.equal(p.preprocess(path), p.preprocess(path))
    x = p.preprocess(path)[None]
    e1, e2 = p.build_encoder(), p.build_encoder()
    assert torch.equal(e1(x), e2(x))
    # init_seed null: deterministic given torch's seed
    q = ImagePlugin(init_seed=None)
    torch.manual_seed(3)
    a = q.build_encoder()(x)
    torch.manual_seed(3)
    assert torch.equal(a, q.build_encoder()(x))
    # train and eval mode give the same output (no dropout / fast path)
    assert torch.equal(e1.train()(x), e1.eval()(x))


def test_encoder_shapes_and_frozen():
    p = ImagePlugin()
    enc = p.build_encoder()
    assert (enc.num_tokens, enc.hidden_size) == (16, 64)
    y = enc(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 16, 64)
    assert not any(t.requires_grad for t in enc.parameters())
    assert all(t.requires_grad for t in ImagePlugin(trainable=True).build_encoder().parameters())
    cls = ImagePlugin(select_feature="cls_patch").build_encoder()
    assert cls.num_tokens == 17 and cls(torch.randn(1, 3, 32, 32)).shape == (1, 17, 64)
    # default (tiny) select_layer is the last block; 0 = the embeddings
    embeddings_only = ImagePlugin(select_layer=0).build_encoder()
    assert embeddings_only(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 64)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown option"):
        ImagePlugin(imagesize=32)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ImagePlugin(image_size=30)
    with pytest.raises(ValueError, match="select_feature"):
        ImagePlugin(select_feature="cls")


def _bad_files(tmp_path):
    png = draw(tmp_path / "ok.png")
    raw = png.read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    sf.write(tmp_path / "sound.wav", np.zeros(1600, np.float32), 16000)
    (tmp_path / "folder.png").mkdir()
    return {
        "missing.png": "file not found",
        "empty.png": "empty file",
        "truncated.png": "truncated",
        "garbage.jpg": "",
        "sound.wav": "not an image file",
        "folder.png": "is a directory",
    }


def test_bad_inputs(tmp_path):
    p = ImagePlugin()
    for name, problem in _bad_files(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(ModalityInputError) as info:
            p.preprocess(path)
        err = info.value
        assert str(path) in str(err) and err.modality == "image"
        assert problem in err.problem, (name, err.problem)
        assert err.__cause__ is None or isinstance(err.__cause__, ModalityInputError)


def test_information_is_preserved(tmp_path):
    """Frozen tiny encoder: colour+shape (mean-pooled) and position (token order) are separable."""
    rng = np.random.default_rng(0)
    p = ImagePlugin()
    enc = p.build_encoder()

    def features(kind_color_pos, pool):
        xs = []
        for i, (kind, color, cx) in enumerate(kind_color_pos):
            jx, jy = rng.integers(-4, 5, 2)
            path = draw(tmp_path / f"s{i}.png", kind, color, cx + jx, 32 + jy)
            xs.append(p.preprocess(path))
        with torch.no_grad():
            y = enc(torch.stack(xs))
        return (y.mean(1) if pool else y.flatten(1)).numpy()

    red_circle, blue_square = ("circle", (255, 0, 0), 32), ("square", (0, 0, 255), 32)
    f = features([red_circle] * 5 + [blue_square] * 5, pool=True)
    assert nearest_centroid_loo(f, [0] * 5 + [1] * 5) == 1.0
    left, right = ("circle", (255, 0, 0), 16), ("circle", (255, 0, 0), 48)
    f = features([left] * 5 + [right] * 5, pool=False)
    assert nearest_centroid_loo(f, [0] * 5 + [1] * 5) == 1.0


# ---- pretrained towers (tiny checkpoints written here; nothing is downloaded) ------------------

@pytest.fixture(scope="module")
def hf_towers(tmp_path_factory):
    from transformers import (CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig,
                              SiglipVisionModel)

    root = tmp_path_factory.mktemp("hf")
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**kw)).save_pretrained(root / "clip")
    SiglipVisionModel(SiglipVisionConfig(**kw)).save_pretrained(root / "siglip")
    return root


def test_pretrained_clip_llava_selection(hf_towers):
    from transformers import CLIPVisionModel

    x = torch.randn(2, 3, 32, 32)
    enc = ImagePlugin(pretrained=str(hf_towers / "clip")).build_encoder()
    assert (enc.num_tokens, enc.hidden_size) == (16, 32)
    ref = CLIPVisionModel.from_pretrained(hf_towers / "clip")
    with torch.no_grad():
        # LLaVA: hidden_states[mm_vision_select_layer=-2], "patch" drops CLS
        want = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.allclose(enc(x), want, atol=1e-5)
        full = ImagePlugin(pretrained=str(hf_towers / "clip"), select_feature="cls_patch",
                           select_layer=-1).build_encoder()
        assert full.num_tokens == 17
        want = ref(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(full(x), want, atol=1e-5)
    assert not any(t.requires_grad for t in enc.parameters())


def test_pretrained_siglip_has_no_cls(hf_towers):
    enc = ImagePlugin(pretrained=str(hf_towers / "siglip"), mean=[0.5] * 3,
                      std=[0.5] * 3).build_encoder()
    assert enc.num_tokens == 16 and enc(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


def test_pretrained_image_size_must_match(hf_towers):
    with pytest.raises(ValueError, match="image_size: 32"):
        ImagePlugin(pretrained=str(hf_towers / "clip"), image_size=64).build_encoder()

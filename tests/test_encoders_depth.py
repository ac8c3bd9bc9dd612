"""The built-in depth modality: 16-bit PNG / .npy / .npz depth -> [2 or 3, S, S] -> tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from encoder_checks import nearest_centroid_loo
import soundfile as sf
import torch
from PIL import Image

from encoders._common import CLIP_MEAN, CLIP_STD
from encoders.depth import DepthPlugin
from mil_plugins.modality import ModalityInputError
from mil_plugins.plugins import MODALITIES


def scene(z_obj=1.0, cx=32, cy=32, wall=4.0, size=(64, 64), rng=None):
    """Metres: a wall and a square object in front of it."""
    d = np.full(size, wall, np.float64)
    if rng is not None:
        d += rng.normal(0, 0.01, size)
    d[cy - 8: cy + 8, cx - 8: cx + 8] = z_obj
    return d


def test_registry_and_class_attributes():
    cls = MODALITIES.get("depth")
    assert cls is DepthPlugin
    assert (cls.name, cls.placeholder) == ("depth", "<depth>")
    json.dumps(cls.default_options)


def test_formats_agree(tmp_path):
    d = scene()
    mm = np.round(d * 1000).astype(np.uint16)
    Image.fromarray(mm).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode == "I;16"
    np.save(tmp_path / "d.npy", d.astype(np.float32))
    np.save(tmp_path / "chw.npy", d[None].astype(np.float32))
    np.savez(tmp_path / "d.npz", other=np.zeros(3), depth=d)
    p = DepthPlugin()
    ref = p.preprocess(tmp_path / "d.png")
    assert ref.shape == (2, 32, 32) and ref.dtype == torch.float32
    for name, opts in [("d.npy", {}), ("chw.npy", {}), ("d.npz", {"npz_key": "depth"})]:
        assert torch.allclose(DepthPlugin(**opts).preprocess(tmp_path / name), ref, atol=1e-4), name
    # the default npz key is the first array: here an all-zero 1-D array -> rejected
    with pytest.raises(ModalityInputError, match="2-D depth map"):
        p.preprocess(tmp_path / "d.npz")


def decode(x):
    """depth_mask output -> (depth in [0, 1] with 0 where invalid, mask in {0, 1})."""
    mask = (x[1] + 1) / 2
    return (x[0] * 0.25 + 0.5) * mask, mask


def test_normalisation_and_mask(tmp_path):
    d = scene(z_obj=1.0, cx=16, cy=16, wall=4.0, size=(32, 32))
    d[0, :] = 0
    d[1, :] = np.nan
    d[2, :] = np.inf
    np.save(tmp_path / "d.npy", d)
    x = DepthPlugin().preprocess(tmp_path / "d.npy")              # fixed 0..10 m
    assert (x[0][:3] == 0).all() and (x[1][:3] == -1).all() and (x[1][3:] == 1).all()
    depth, mask = decode(x)
    assert (mask[:3] == 0).all() and (depth[:3] == 0).all() and (mask[3:] == 1).all()
    assert torch.isclose(depth[16, 16], torch.tensor(0.1)) and torch.isclose(depth[30, 2],
                                                                             torch.tensor(0.4))
    rel = decode(DepthPlugin(depth_min=None, depth_max=None).preprocess(tmp_path / "d.npy"))[0]
    assert rel[16, 16] == 0 and rel[30, 2] == 1                   # per-image min/max
    inv = decode(DepthPlugin(depth_min=None, depth_max=None, invert=True)
                 .preprocess(tmp_path / "d.npy"))[0]
    assert inv[16, 16] == 1 and inv[30, 2] == 0 and inv[0, 0] == 0
    gray = DepthPlugin(render="gray3").preprocess(tmp_path / "d.npy")
    assert gray.shape == (3, 32, 32)
    std, mean = torch.tensor(CLIP_STD)[:, None, None], torch.tensor(CLIP_MEAN)[:, None, None]
    assert torch.allclose(gray * std + mean, depth.expand(3, -1, -1), atol=1e-6)
    # constant map with per-image bounds -> 0.5; wide map -> centre crop
    np.save(tmp_path / "flat.npy", np.full((40, 80), 2.0))
    flat = DepthPlugin(depth_min=None, depth_max=None).preprocess(tmp_path / "flat.npy")
    assert flat.shape == (2, 32, 32) and torch.allclose(decode(flat)[0], torch.full((32, 32), 0.5))


def test_determinism_and_encoder(tmp_path):
    np.save(tmp_path / "d.npy", scene())
    p = DepthPlugin()
    x = p.preprocess(tmp_path / "d.npy")
    assert torch.equal(x, p.preprocess(tmp_path / "d.npy"))
    e1, e2 = p.build_encoder(), p.build_encoder()
    assert (e1.num_tokens, e1.hidden_size) == (16, 64)
    y = e1(x[None])
    assert y.shape == (1, 16, 64) and torch.equal(y, e2(x[None]))
    assert torch.equal(e1.train()(x[None]), e1.eval()(x[None]))
    assert not any(t.requires_grad for t in e1.parameters())
    g = DepthPlugin(render="gray3").build_encoder()
    assert g(torch.randn(1, 3, 32, 32)).shape == (1, 16, 64)


def test_bad_options():
    with pytest.raises(ValueError, match="render"):
        DepthPlugin(render="jet")
    with pytest.raises(ValueError, match="depth_max"):
        DepthPlugin(depth_min=5.0, depth_max=1.0)
    with pytest.raises(ValueError, match="gray3"):
        DepthPlugin(pretrained="openai/clip-vit-large-patch14")


def test_bad_inputs(tmp_path):
    np.save(tmp_path / "zeros.npy", np.zeros((16, 16)))
    np.save(tmp_path / "nans.npy", np.full((16, 16), np.nan))
    np.save(tmp_path / "cube.npy", np.ones((4, 16, 16)))
    np.save(tmp_path / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.savez(tmp_path / "d.npz", depth=np.ones((8, 8)))
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(tmp_path / "invalid.png")
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "photo.png")
    Image.fromarray(np.full((64, 64), 1500, np.uint16)).save(tmp_path / "ok.png")
    raw = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "empty.npy").write_bytes(b"")
    sf.write(tmp_path / "sound.wav", np.zeros(800, np.float32), 16000)
    cases = {
        "missing.png": ({}, "file not found"),
        "empty.npy": ({}, "empty file"),
        "zeros.npy": ({}, "no valid depth pixel: all 256 are 0"),
        "nans.npy": ({}, "no valid depth pixel"),
        "invalid.png": ({}, "no valid depth pixel"),
        "cube.npy": ({}, "expected a 2-D depth map"),
        "strings.npy": ({}, "dtype"),
        "d.npz": ({"npz_key": "disparity"}, "npz_key 'disparity' not in the archive"),
        "photo.png": ({}, "not a single-channel depth map"),
        "truncated.png": ({}, "truncated"),
        "corrupt.npy": ({}, "not a readable .npy"),
        "sound.wav": ({}, "not a depth image file"),
    }
    for name, (opts, problem) in cases.items():
        path = tmp_path / name
        with pytest.raises(ModalityInputError) as info:
            DepthPlugin(**opts).preprocess(path)
        err = info.value
        assert str(path) in str(err) and err.modality == "depth"
        assert problem in err.problem, (name, err.problem)


@pytest.mark.parametrize("attribute", ["near_far", "left_right"])
def test_information_is_preserved(tmp_path, attribute):
    """Frozen tiny encoder: near/far (mean-pooled) and left/right (token order) separate."""
    rng = np.random.default_rng(0)
    p = DepthPlugin()
    enc = p.build_encoder()
    xs, labels = [], []
    for i in range(12):
        c = i % 2
        jx, jy = rng.integers(-4, 5, 2)
        if attribute == "near_far":
            d = scene(z_obj=(0.8, 2.2)[c] * rng.uniform(0.9, 1.1), cx=32 + jx, cy=32 + jy, rng=rng)
        else:
            d = scene(z_obj=1.5, cx=(16, 48)[c] + jx // 2, cy=32 + jy, rng=rng)
        mm = np.round(d * 1000).astype(np.uint16)
        Image.fromarray(mm).save(tmp_path / f"{attribute}{i}.png")
        xs.append(p.preprocess(tmp_path / f"{attribute}{i}.png"))
        labels.append(c)
    with torch.no_grad():
        y = enc(torch.stack(xs))
    f = (y.mean(1) if attribute == "near_far" else y.flatten(1)).numpy()
    assert nearest_centroid_loo(f, labels) == 1.0


def test_pretrained_needs_gray3(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, image_size=32, patch_size=8)
                    ).save_pretrained(tmp_path / "clip")
    p = DepthPlugin(pretrained=str(tmp_path / "clip"), render="gray3")
    np.save(tmp_path / "d.npy", scene())
    enc = p.build_encoder()
    assert enc(p.preprocess(tmp_path / "d.npy")[None]).shape == (1, 16, 32)


def test_openexr_depth(tmp_path):
    OpenEXR = pytest.importorskip("OpenEXR")
    z = np.full((32, 32), 4.0, dtype=np.float32)
    z[8:24, 8:24] = 1.0
    z[0, 0] = np.nan
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, {"Z": z}) as f:
        f.write(str(tmp_path / "d.exr"))
    np.save(tmp_path / "d.npy", z)
    from_exr = DepthPlugin().preprocess(tmp_path / "d.exr")
    assert torch.equal(from_exr, DepthPlugin().preprocess(tmp_path / "d.npy"))
    with OpenEXR.File(header, {"R": z, "G": z}) as f:
        f.write(str(tmp_path / "rg.exr"))
    assert torch.equal(DepthPlugin().preprocess(tmp_path / "rg.exr"), from_exr)  # R as depth
    with pytest.raises(ModalityInputError, match="exr_channel 'Q' not in the file"):
        DepthPlugin(exr_channel="Q").preprocess(tmp_path / "rg.exr")
    (tmp_path / "bad.exr").write_bytes(b"not exr at all")
    with pytest.raises(ModalityInputError, match="bad.exr: not a readable OpenEXR file"):
        DepthPlugin().preprocess(tmp_path / "bad.exr")

"""The built-in point-cloud modality: open3d / .npy -> [num_points, 3|6] -> Point-BERT tokens."""

from __future__ import annotations

import json

import numpy as np
import open3d as o3d
import pytest
from encoder_checks import assert_bad_inputs, nearest_centroid_loo
import soundfile as sf
import torch
from PIL import Image

from encoders.point import PointCloudPlugin, farthest_point_order, sample_indices, save_encoder
from mil_plugins.plugins import MODALITIES


def write_cloud(path, xyz, rgb=None, ascii=False):
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(xyz, np.float64)))
    if rgb is not None:
        pcd.colors = o3d.utility.Vector3dVector(np.asarray(rgb, np.float64))
    assert o3d.io.write_point_cloud(str(path), pcd, write_ascii=ascii)
    return path


def surface(kind, rng, n=600):
    if kind == "sphere":
        v = rng.normal(size=(n, 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
    elif kind == "cube":
        v = rng.uniform(-1, 1, (n, 3))
        axis = rng.integers(0, 3, n)
        v[np.arange(n), axis] = rng.choice([-1.0, 1.0], n)
    elif kind == "cylinder":
        a, z = rng.uniform(0, 2 * np.pi, n), rng.uniform(-1, 1, n)
        v = np.stack([np.cos(a), np.sin(a), z], 1)
    else:  # cone
        a, h = rng.uniform(0, 2 * np.pi, n), np.sqrt(rng.uniform(0, 1, n))
        v = np.stack([h * np.cos(a), h * np.sin(a), 1 - 2 * h], 1)
    return v * rng.uniform(0.5, 2.0) + rng.normal(0, 1, 3)


def test_registry_and_class_attributes():
    cls = MODALITIES.get("point")
    assert cls is PointCloudPlugin
    assert (cls.name, cls.placeholder) == ("point", "<point>")
    json.dumps(cls.default_options)


@pytest.mark.parametrize("suffix,ascii", [(".ply", False), (".ply", True), (".pcd", False),
                                          (".pts", True), (".xyz", True)])
def test_round_trip_open3d_formats(tmp_path, suffix, ascii):
    rng = np.random.default_rng(0)
    xyz, rgb = rng.uniform(-3, 5, (800, 3)), rng.uniform(0, 1, (800, 3))
    path = write_cloud(tmp_path / f"c{suffix}", xyz, rgb, ascii)
    colors = suffix != ".xyz"                      # XYZ holds no colours
    x = PointCloudPlugin(use_colors=colors).preprocess(path)
    assert x.shape == (512, 6 if colors else 3) and x.dtype == torch.float32
    norms = x[:, :3].norm(dim=1)
    assert norms.max() <= 1 + 1e-5
    centred = (xyz - xyz.mean(0)) / np.linalg.norm(xyz - xyz.mean(0), axis=1).max()
    assert torch.allclose(x[0, :3], torch.tensor(centred[0], dtype=torch.float32), atol=1e-4)
    if colors:
        assert x[:, 3:].min() >= 0 and x[:, 3:].max() <= 1


def test_npy_inputs_and_colour_scales(tmp_path):
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(700, 3))
    np.save(tmp_path / "xyz.npy", xyz)
    np.save(tmp_path / "rgb255.npy", np.concatenate([xyz, np.full((700, 3), 255.0)], 1))
    a = PointCloudPlugin(use_colors=False).preprocess(tmp_path / "xyz.npy")
    b = PointCloudPlugin().preprocess(tmp_path / "rgb255.npy")
    assert a.shape == (512, 3) and b.shape == (512, 6)
    assert torch.equal(a, b[:, :3]) and (b[:, 3:] == 1).all()


def test_fps_sampling_and_repetition(tmp_path):
    xyz = np.array([[0, 0, 0], [1, 0, 0], [0.9, 0, 0], [0, 2, 0], [0, 0, -1]], np.float64)
    assert farthest_point_order(xyz, 3).tolist() == [0, 3, 1]     # selection order
    assert sample_indices(xyz, 3).tolist() == [0, 1, 3]           # same set, file order
    assert sample_indices(xyz, 7).tolist() == [0, 1, 2, 3, 4, 0, 1]   # cyclic repetition
    cloud = np.random.default_rng(9).normal(size=(3000, 3))
    fast = sample_indices(cloud, 256)                              # open3d
    assert np.array_equal(fast, sample_indices(cloud, 256, use_open3d=False))
    assert fast[0] == 0 and len(set(fast.tolist())) == 256
    np.save(tmp_path / "few.npy", xyz)
    x = PointCloudPlugin(use_colors=False, num_points=32, num_groups=4,
                         group_size=4).preprocess(tmp_path / "few.npy")
    assert x.shape == (32, 3)
    assert torch.equal(x[:5], x[5:10])              # all 5 points, then again
    assert abs(float(x.norm(dim=1).max()) - 1) < 1e-6


def test_voxel_downsampling(tmp_path):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "dense.npy", rng.uniform(0, 1, (5000, 3)))
    x = PointCloudPlugin(use_colors=False, voxel_size=0.25).preprocess(tmp_path / "dense.npy")
    assert x.shape == (512, 3)
    assert len(torch.unique(x, dim=0)) <= 125       # 5x5x5 voxels at most (grid from the min)


def test_determinism_and_encoder(tmp_path):
    rng = np.random.default_rng(3)
    path = write_cloud(tmp_path / "c.ply", rng.normal(size=(900, 3)), rng.uniform(0, 1, (900, 3)))
    p = PointCloudPlugin()
    x = p.preprocess(path)
    assert torch.equal(x, p.preprocess(path))
    e1, e2 = p.build_encoder(), p.build_encoder()
    assert (e1.num_tokens, e1.hidden_size) == (16, 64)
    y = e1(x[None])
    assert y.shape == (1, 16, 64) and torch.equal(y, e2(x[None]))
    assert torch.equal(e1.train()(x[None]), e1.eval()(x[None]))
    assert not any(t.requires_grad for t in e1.parameters())
    cls = PointCloudPlugin(use_colors=False, select_feature="cls_patch").build_encoder()
    assert cls.num_tokens == 17 and cls(torch.randn(2, 512, 3)).shape == (2, 17, 64)


def test_pretrained_safetensors_round_trip(tmp_path):
    p = PointCloudPlugin(init_seed=7)
    weights = save_encoder(p.build_encoder(), tmp_path / "w" / "model.safetensors")
    x = torch.randn(2, 512, 6)
    want = p.build_encoder()(x)
    for where in (weights, weights.parent):       # the file, or its directory
        loaded = PointCloudPlugin(pretrained=str(where), init_seed=0).build_encoder()
        assert torch.equal(loaded(x), want)
    with pytest.raises(ValueError, match="do not fit"):
        PointCloudPlugin(pretrained=str(weights), hidden_size=32).build_encoder()
    with pytest.raises(ValueError, match="not found"):
        PointCloudPlugin(pretrained=str(tmp_path / "nope.safetensors")).build_encoder()


def test_bad_options():
    with pytest.raises(ValueError, match="num_points"):
        PointCloudPlugin(num_points=8, num_groups=16)
    with pytest.raises(ValueError, match="voxel_size"):
        PointCloudPlugin(voxel_size=0)


def test_bad_inputs(tmp_path):
    rng = np.random.default_rng(4)
    xyz, rgb = rng.normal(size=(300, 3)), rng.uniform(0, 1, (300, 3))
    nan = xyz.copy()
    nan[[3, 7, 9], 1] = np.nan
    write_cloud(tmp_path / "nan.ply", nan)
    np.save(tmp_path / "nan.npy", nan)
    write_cloud(tmp_path / "one.ply", xyz[:1], rgb[:1])
    np.save(tmp_path / "zero.npy", np.zeros((0, 3)))
    np.save(tmp_path / "same.npy", np.ones((50, 6)))
    np.save(tmp_path / "wrong_shape.npy", np.ones((50, 4)))
    good = write_cloud(tmp_path / "good.ply", xyz, rgb).read_bytes()
    (tmp_path / "truncated.ply").write_bytes(good[: len(good) // 2])
    text = write_cloud(tmp_path / "text.ply", xyz, rgb, ascii=True).read_bytes()
    (tmp_path / "truncated_ascii.ply").write_bytes(text[: len(text) // 2])
    pcd = write_cloud(tmp_path / "good.pcd", xyz, rgb).read_bytes()
    (tmp_path / "truncated.pcd").write_bytes(pcd[: len(pcd) // 2])
    (tmp_path / "empty.ply").write_bytes(b"")
    sf.write(tmp_path / "sound.wav", np.zeros(800, np.float32), 16000)
    (tmp_path / "sound.ply").write_bytes((tmp_path / "sound.wav").read_bytes())
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    write_cloud(tmp_path / "plain.xyz", xyz)
    cases = {
        "missing.ply": "file not found",
        "empty.ply": "empty file",
        "nan.ply": "3 of 300 points have NaN",
        "nan.npy": "3 of 300 points have NaN",
        "one.ply": "single point",
        "zero.npy": "no points",
        "same.npy": "all 50 points are at the same place",
        "wrong_shape.npy": "expected an array [N, 3]",
        "truncated.ply": "truncated PLY",
        "truncated_ascii.ply": "truncated PLY",
        "truncated.pcd": "no points read",
        "sound.ply": "not a PLY file",
        "sound.wav": "unsupported file type '.wav'",
        "picture.png": "unsupported file type '.png'",
        "plain.xyz": "no colours but use_colors is true",
    }
    assert_bad_inputs(PointCloudPlugin(), tmp_path, cases)


def test_shape_class_is_preserved(tmp_path):
    """Frozen tiny encoder, mean-pooled tokens: sphere / cube / cylinder / cone separate."""
    rng = np.random.default_rng(5)
    p = PointCloudPlugin(use_colors=False)
    enc = p.build_encoder()
    xs, labels = [], []
    for i in range(24):
        kind = ("sphere", "cube", "cylinder", "cone")[i % 4]
        path = write_cloud(tmp_path / f"{kind}{i}.ply", surface(kind, rng, 1000))
        xs.append(p.preprocess(path))
        labels.append(kind)
    with torch.no_grad():
        f = enc(torch.stack(xs)).mean(1).numpy()
    assert nearest_centroid_loo(f, labels) >= 0.9      # chance: 0.25

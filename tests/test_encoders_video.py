"""The built-in video modality: PyAV files and frame folders -> [F, 3, S, S] -> tokens."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from encoder_checks import assert_bad_inputs, nearest_centroid_loo
import soundfile as sf
import torch
from PIL import Image

from encoders.video import VideoPlugin, sample_indices
from mil_plugins.plugins import MODALITIES


def write_video(path, frames, codec="mpeg4", fps=8):
    """Encode uint8 [N, H, W, 3] frames with PyAV (yuv420p)."""
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    for f in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def gray_ramp(n, size=32):
    """n frames whose brightness increases with the frame index."""
    return np.stack([np.full((size, size, 3), 20 + i * 200 // max(1, n - 1), np.uint8)
                     for i in range(n)])


def moving_square(direction, rng, n=8, size=32):
    y0 = int(rng.integers(8, 24))
    frames = np.full((n, size, size, 3), 90, np.uint8)
    for i in range(n):
        x = 4 + i * 3 if direction == "right" else 27 - i * 3
        x += int(rng.integers(-1, 2))
        frames[i, y0 - 3: y0 + 3, max(0, x - 3): x + 3] = (255, 220, 0)
    return frames


def test_registry_and_class_attributes():
    cls = MODALITIES.get("video")
    assert cls is VideoPlugin
    assert (cls.name, cls.placeholder) == ("video", "<video>")
    json.dumps(cls.default_options)


def test_sample_indices():
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(4, 4) == [0, 1, 2, 3]
    assert sample_indices(2, 4) == [0, 0, 1, 1]     # fewer frames than asked: repetition
    assert sample_indices(3, 4) == [0, 1, 1, 2]


@pytest.mark.parametrize("codec,suffix", [("mpeg4", ".mp4"), ("libvpx", ".webm"),
                                          ("mpeg4", ".avi")])
def test_round_trip_containers(tmp_path, codec, suffix):
    if codec not in av.codecs_available:
        pytest.skip(f"PyAV lacks {codec}")
    path = write_video(tmp_path / f"v{suffix}", gray_ramp(10), codec)
    x = VideoPlugin().preprocess(path)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    brightness = x.mean((1, 2, 3))
    assert (brightness[1:] > brightness[:-1]).all()    # frames in order, uniformly spread


def test_frame_folder_natural_order_and_repetition(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, v in enumerate([10, 120, 250]):
        Image.new("RGB", (40, 40), (v, v, v)).save(folder / f"f{i * 5}.png")  # f0, f5, f10
    (folder / "notes.txt").write_text("ignored")
    x = VideoPlugin().preprocess(folder)
    assert x.shape == (4, 3, 32, 32)
    b = x.mean((1, 2, 3))
    assert b[0] < b[1] and torch.equal(x[1], x[2]) and b[2] < b[3]   # 0, 1, 1, 2 in natural order


def test_few_frames_are_repeated(tmp_path):
    path = write_video(tmp_path / "two.mp4", gray_ramp(2))
    x = VideoPlugin().preprocess(path)
    assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[3]) and not torch.equal(x[0], x[3])


def test_determinism_and_encoder(tmp_path):
    path = write_video(tmp_path / "a.mp4", gray_ramp(6))
    p = VideoPlugin()
    x = p.preprocess(path)
    assert torch.equal(x, p.preprocess(path))
    e1, e2 = p.build_encoder(), p.build_encoder()
    assert (e1.num_tokens, e1.hidden_size) == (16, 64)      # 4 frames x (4x4 grid pooled to 2x2)
    y = e1(x[None])
    assert y.shape == (1, 16, 64) and torch.equal(y, e2(x[None]))
    assert torch.equal(e1.train()(x[None]), e1.eval()(x[None]))
    assert not any(t.requires_grad for t in e1.parameters())
    mean = VideoPlugin(temporal="mean", spatial_pool=1).build_encoder()
    assert mean.num_tokens == 16 and mean(x[None]).shape == (1, 16, 64)
    concat = VideoPlugin(spatial_pool=1, num_frames=2).build_encoder()
    assert concat.num_tokens == 32 and concat(torch.randn(2, 2, 3, 32, 32)).shape == (2, 32, 64)


def test_bad_options():
    with pytest.raises(ValueError, match="temporal"):
        VideoPlugin(temporal="max")
    with pytest.raises(ValueError, match="min_frames"):
        VideoPlugin(min_frames=5, num_frames=4)


def test_bad_inputs(tmp_path):
    write_video(tmp_path / "one.mp4", gray_ramp(1))
    good = write_video(tmp_path / "good.mp4", gray_ramp(10)).read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x01garbage" * 100)
    (tmp_path / "empty.mp4").write_bytes(b"")
    sf.write(tmp_path / "sound.wav", np.zeros(8000, np.float32), 16000)
    Image.new("RGB", (16, 16)).save(tmp_path / "still.png")
    (tmp_path / "empty_dir").mkdir()
    one = tmp_path / "one_frame_dir"
    one.mkdir()
    Image.new("RGB", (16, 16)).save(one / "0.png")
    bad = tmp_path / "bad_frame_dir"
    bad.mkdir()
    Image.new("RGB", (16, 16)).save(bad / "0.png")
    (bad / "1.png").write_bytes(b"not a png")
    cases = {
        "missing.mp4": "file not found",
        "empty.mp4": "empty file",
        "one.mp4": "only 1 decodable frame",
        "truncated.mp4": "truncated",
        "garbage.mp4": "not a video file",
        "sound.wav": "no video stream",
        "still.png": "still image",
        "empty_dir": "no image files",
        "one_frame_dir": "only 1 decodable frame",
        "bad_frame_dir": "frame 1.png",
    }
    assert_bad_inputs(VideoPlugin(), tmp_path, cases)


def test_motion_direction_is_preserved(tmp_path):
    """Frozen tiny encoder (concat): left-to-right and right-to-left motion are separable."""
    rng = np.random.default_rng(0)
    p = VideoPlugin()
    enc = p.build_encoder()
    xs, labels = [], []
    for i in range(12):
        direction = ("left", "right")[i % 2]
        path = write_video(tmp_path / f"m{i}.mp4", moving_square(direction, rng))
        xs.append(p.preprocess(path))
        labels.append(direction)
    with torch.no_grad():
        f = enc(torch.stack(xs)).flatten(1).numpy()
    assert nearest_centroid_loo(f, labels) == 1.0


# ---- pretrained tower ---------------------------------------------------------------------------

def test_pretrained_clip_per_frame(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=32, patch_size=8)
                    ).save_pretrained(tmp_path / "clip")
    enc = VideoPlugin(pretrained=str(tmp_path / "clip"), spatial_pool=1,
                      temporal="mean").build_encoder()
    assert (enc.num_tokens, enc.hidden_size) == (16, 32)
    x = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        per_frame = torch.stack([enc.tower(x[:, i]) for i in range(4)], 1).mean(1)
        assert torch.allclose(enc(x), per_frame, atol=1e-5)

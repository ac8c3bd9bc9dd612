"""mil_plugins.cache: content-addressed, atomically written features of frozen encoders."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from encoders.audio import AudioPlugin
from encoders.image import ImagePlugin
from encoders.video import VideoPlugin
from mil_plugins.cache import (FeatureCache, cached_encode, cached_encode_batch, content_hash,
                               encoder_fingerprint)


def image(path, color=(255, 0, 0)):
    Image.new("RGB", (40, 40), color).save(path)
    return path


def test_encoder_fingerprint():
    a, b = ImagePlugin().build_encoder(), ImagePlugin().build_encoder()
    assert encoder_fingerprint(a) == encoder_fingerprint(b)
    assert encoder_fingerprint(a) != encoder_fingerprint(ImagePlugin(init_seed=1).build_encoder())
    with torch.no_grad():
        b.tower.model.cls_token.add_(1e-3)
    assert encoder_fingerprint(a) != encoder_fingerprint(b)
    half = ImagePlugin().build_encoder().to(torch.bfloat16)        # any dtype hashes
    assert encoder_fingerprint(half) != encoder_fingerprint(a)


def test_key_depends_on_content_options_and_weights(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    p = ImagePlugin()
    a = image(tmp_path / "a.png")
    copy = tmp_path / "elsewhere" / "b.png"
    copy.parent.mkdir()
    shutil.copy(a, copy)
    key = cache.key(p, a, "w1")
    assert len(key) == 64
    assert cache.key(p, copy, "w1") == key                       # same bytes, other path
    assert cache.key(p, a, "w2") != key                          # other weights
    assert cache.key(ImagePlugin(image_size=64), a, "w1") != key  # other options
    image(a, (0, 0, 255))                                        # content changed in place
    assert cache.key(p, a, "w1") != key
    assert FeatureCache(tmp_path / "c2", memoize_hashes=False).key(p, a, "w1") == cache.key(p, a,
                                                                                             "w1")


def test_folder_inputs_hash_their_files(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        image(frames / f"{i}.png", (i * 80, 0, 0))
    h = content_hash(frames)
    (frames / "2.png").rename(frames / "3.png")
    assert content_hash(frames) != h
    cache = FeatureCache(tmp_path / "cache")
    k = cache.key(VideoPlugin(), frames, "w")
    image(frames / "3.png", (0, 255, 0))
    assert cache.key(VideoPlugin(), frames, "w") != k


def test_put_get_round_trip_and_atomic(tmp_path):
    cache = FeatureCache(tmp_path)
    assert cache.get("ab" * 32) is None
    t = torch.randn(16, 64)
    cache.put("ab" * 32, t)
    assert torch.equal(cache.get("ab" * 32), t)
    assert "ab" * 32 in cache
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert [f.name for f in files] == ["ab" * 32 + ".safetensors"]   # no temporary file left
    files[0].write_bytes(b"corrupt")                                  # a damaged entry is a miss
    assert cache.get("ab" * 32) is None
    cache.put("ab" * 32, t)
    assert torch.equal(cache.get("ab" * 32), t)


def test_cached_encode_hits_skip_preprocessing(tmp_path, monkeypatch):
    p = ImagePlugin()
    enc = p.build_encoder()
    fp = encoder_fingerprint(enc)
    cache = FeatureCache(tmp_path / "cache")
    path = image(tmp_path / "a.png")
    first = cached_encode(cache, p, enc, path, fp)
    assert first.shape == (16, 64)
    with torch.no_grad():
        assert torch.allclose(first, enc(p.preprocess(path)[None])[0])

    def boom(_path):
        raise AssertionError("preprocess must not run on a cache hit")

    monkeypatch.setattr(p, "preprocess", boom)
    again = cached_encode(cache, p, enc, path, fp)
    assert torch.equal(again, first) and cache.hits == 1


def test_cached_encode_batch(tmp_path):
    p = AudioPlugin()
    enc = p.build_encoder()
    fp = encoder_fingerprint(enc)
    paths = []
    for i in range(5):
        y = 0.3 * np.sin(2 * np.pi * (300 + 100 * i) * np.arange(16000) / 16000)
        sf.write(tmp_path / f"{i}.wav", y, 16000)
        paths.append(tmp_path / f"{i}.wav")
    cache = FeatureCache(tmp_path / "cache")
    cached_encode(cache, p, enc, paths[2], fp)
    out = cached_encode_batch(cache, p, enc, paths, fp, batch_size=2)
    assert len(out) == 5 and all(t.shape == (10, 64) for t in out)
    for path, t in zip(paths, out):
        assert torch.allclose(cached_encode(cache, p, enc, path, fp), t)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 5


def test_missing_file_is_a_modality_error_not_a_cache_error(tmp_path):
    from mil_plugins.modality import ModalityInputError

    cache = FeatureCache(tmp_path / "cache")
    p = ImagePlugin()
    with pytest.raises(ModalityInputError, match="file not found"):
        cached_encode(cache, p, p.build_encoder(), tmp_path / "missing.png", "w")


def test_plugin_version_bump_invalidates_cached_features(tmp_path):
    from encoders.image import ImagePlugin
    from mil_plugins.cache import FeatureCache

    class ImageV2(ImagePlugin):
        version = "2"

    f = tmp_path / "x.bin"
    f.write_bytes(b"same bytes")
    cache = FeatureCache(tmp_path / "cache")
    assert ImagePlugin().fingerprint() != ImageV2().fingerprint()
    assert cache.key(ImagePlugin(), f, "w") != cache.key(ImageV2(), f, "w")
    assert cache.key(ImagePlugin(), f, "w") == cache.key(ImagePlugin(), f, "w")

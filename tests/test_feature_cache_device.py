"""The feature cache feeds an encoder what it takes: a bf16 encoder (the model after DeepSpeed's
bf16 cast) gets bf16 input from the float32 preprocessors, and the cache stores CPU tensors (on a
GPU the encoder's device differs from the preprocessor's). Found by bench/gpu_check.py's ZeRO dry run."""

from __future__ import annotations

import torch
from PIL import Image

from encoders.image import ImagePlugin
from mil_plugins.cache import FeatureCache, cached_encode, cached_encode_batch, encoder_fingerprint


def test_cached_encode_casts_input_to_a_bf16_encoder(tmp_path):
    plugin = ImagePlugin()
    encoder = plugin.build_encoder().to(torch.bfloat16)
    paths = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 40), color).save(paths[-1])
    cache = FeatureCache(tmp_path / "cache")
    fp = encoder_fingerprint(encoder)
    one = cached_encode(cache, plugin, encoder, paths[0], fp)
    assert one.dtype == torch.bfloat16 and one.device.type == "cpu"
    assert tuple(one.shape) == (encoder.num_tokens, encoder.hidden_size)
    with torch.no_grad():
        want = encoder(plugin.preprocess(paths[0])[None].to(torch.bfloat16))[0]
    assert torch.equal(one, want)
    both = cached_encode_batch(FeatureCache(tmp_path / "cache2"), plugin, encoder, paths, fp)
    assert [t.dtype for t in both] == [torch.bfloat16] * 2 and all(t.device.type == "cpu" for t in both)
    assert torch.equal(cached_encode(cache, plugin, encoder, paths[0], fp), one)  # a hit

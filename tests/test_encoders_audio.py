"""The built-in audio modality: soundfile files -> log-mel [n_mels, frames] -> tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from encoder_checks import assert_bad_inputs, nearest_centroid_loo
import soundfile as sf
import torch
from PIL import Image

from encoders.audio import AudioPlugin
from mil_plugins.plugins import MODALITIES

SR = 16000


def tone(seconds=1.0, freq=440.0, amp=0.3, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def beeps(rng, freq=600.0, amp=0.3, count=1, sr=SR):
    y = rng.normal(0, 0.003, sr)
    t = np.arange(sr) / sr
    for b in range(count):
        s = int((0.05 + 0.3 * b) * sr) + int(rng.integers(0, 400))
        e = s + int(0.15 * sr)
        y[s:e] += amp * np.sin(2 * np.pi * freq * t[s:e])
    return y.astype(np.float32)


def test_registry_and_class_attributes():
    cls = MODALITIES.get("audio")
    assert cls is AudioPlugin
    assert (cls.name, cls.placeholder) == ("audio", "<audio>")
    json.dumps(cls.default_options)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_round_trip_formats(tmp_path, fmt):
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, tone(), SR, format=fmt)
    x = AudioPlugin().preprocess(path)
    assert x.shape == (32, 100) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def test_resample_mixdown_crop_and_pad(tmp_path):
    p = AudioPlugin()
    sf.write(tmp_path / "16k.wav", tone(), SR, subtype="FLOAT")
    ref = p.preprocess(tmp_path / "16k.wav")
    # another sample rate is resampled, not an error
    sf.write(tmp_path / "44k.wav", tone(sr=44100), 44100, subtype="FLOAT")
    assert (p.preprocess(tmp_path / "44k.wav") - ref).abs().mean() < 0.05
    # stereo -> mean of the channels
    stereo = np.stack([tone(amp=0.5), tone(amp=0.1)], 1)
    sf.write(tmp_path / "stereo.wav", stereo, SR, subtype="FLOAT")
    sf.write(tmp_path / "mono.wav", stereo.mean(1), SR, subtype="FLOAT")
    assert torch.allclose(p.preprocess(tmp_path / "stereo.wav"),
                          p.preprocess(tmp_path / "mono.wav"), atol=1e-5)
    # longer than max_seconds: only the start is kept
    long = np.concatenate([tone(), np.random.default_rng(0).normal(0, 0.5, SR).astype(np.float32)])
    sf.write(tmp_path / "long.wav", long, SR, subtype="FLOAT")
    assert torch.allclose(p.preprocess(tmp_path / "long.wav"), ref, atol=1e-5)
    # shorter: padded with silence at the end
    half = tone(0.5)
    sf.write(tmp_path / "half.wav", half, SR, subtype="FLOAT")
    sf.write(tmp_path / "padded.wav", np.concatenate([half, np.zeros(SR // 2, np.float32)]), SR,
             subtype="FLOAT")
    assert torch.allclose(p.preprocess(tmp_path / "half.wav"),
                          p.preprocess(tmp_path / "padded.wav"))


def test_log_mel_modes_and_shapes(tmp_path):
    sf.write(tmp_path / "a.wav", tone(2.0), SR)
    for mode in ("db", "whisper", "ast"):
        x = AudioPlugin(log_mel=mode, n_mels=16, max_seconds=2.0).preprocess(tmp_path / "a.wav")
        assert x.shape == (16, 200) and torch.isfinite(x).all()


def test_determinism_and_encoder(tmp_path):
    sf.write(tmp_path / "a.wav", tone(), SR)
    p = AudioPlugin()
    x = p.preprocess(tmp_path / "a.wav")
    assert torch.equal(x, p.preprocess(tmp_path / "a.wav"))
    e1, e2 = p.build_encoder(), p.build_encoder()
    assert (e1.num_tokens, e1.hidden_size) == (10, 64)
    y = e1(x[None])
    assert y.shape == (1, 10, 64) and torch.equal(y, e2(x[None]))
    assert torch.equal(e1.train()(x[None]), e1.eval()(x[None]))
    assert not any(t.requires_grad for t in e1.parameters())
    pooled = AudioPlugin(token_pool=3, select_feature="cls_patch").build_encoder()
    assert pooled.num_tokens == 1 + 4 and pooled(x[None]).shape == (1, 5, 64)


def test_bad_options():
    with pytest.raises(ValueError, match="log_mel"):
        AudioPlugin(log_mel="mfcc")
    with pytest.raises(ValueError, match="patch_frames"):
        AudioPlugin(max_seconds=0.05)


def test_bad_inputs(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), SR)
    nan = tone()
    nan[10:20] = np.nan
    sf.write(tmp_path / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(tmp_path / "allnan.wav", np.full(100, np.nan, np.float32), SR, subtype="FLOAT")
    sf.write(tmp_path / "ok.wav", tone(), SR)
    raw = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "truncated.wav").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "header_only.wav").write_bytes(raw[:30])
    (tmp_path / "empty.wav").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    (tmp_path / "text.flac").write_text("not audio at all\n" * 20)
    cases = {
        "missing.wav": "file not found",
        "empty.wav": "empty file",
        "zero.wav": "zero-length audio",
        "nan.wav": "10 of 16000 samples are NaN or infinite",
        "allnan.wav": "all samples are NaN",
        "truncated.wav": "truncated",
        "header_only.wav": "not an audio file",
        "picture.png": "not an audio file",
        "text.flac": "not an audio file",
    }
    assert_bad_inputs(AudioPlugin(), tmp_path, cases)


@pytest.mark.parametrize("attribute", ["pitch", "count", "loudness"])
def test_information_is_preserved(tmp_path, attribute):
    """Frozen tiny encoder, mean-pooled tokens: pitch, number of beeps and loudness separate."""
    rng = np.random.default_rng(0)
    p = AudioPlugin()
    enc = p.build_encoder()
    xs, labels = [], []
    for i in range(12):
        c = i % 2
        jitter = 1 + rng.uniform(-0.05, 0.05)
        kw = {"pitch": dict(freq=(440.0, 880.0)[c] * jitter),
              "count": dict(count=(1, 3)[c], freq=600 * jitter),
              "loudness": dict(amp=(0.05, 0.5)[c] * jitter, freq=600 * jitter)}[attribute]
        path = tmp_path / f"{attribute}{i}.wav"
        sf.write(path, beeps(rng, **kw), SR)
        xs.append(p.preprocess(path))
        labels.append(c)
    with torch.no_grad():
        f = enc(torch.stack(xs)).mean(1).numpy()
    assert nearest_centroid_loo(f, labels) == 1.0


# ---- pretrained AST / Whisper (tiny checkpoints written here) -----------------------------------

@pytest.fixture(scope="module")
def hf_audio(tmp_path_factory):
    from transformers import ASTConfig, ASTModel, WhisperConfig, WhisperModel

    root = tmp_path_factory.mktemp("hf_audio")
    torch.manual_seed(0)
    ASTModel(ASTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_mel_bins=32, max_length=100,
                       frequency_stride=16, time_stride=16)).save_pretrained(root / "ast")
    WhisperModel(WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1,
                               encoder_attention_heads=4, decoder_attention_heads=4,
                               encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=32,
                               max_source_positions=50, max_target_positions=16, vocab_size=100,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               decoder_start_token_id=1)).save_pretrained(root / "whisper")
    return root


def test_pretrained_ast(hf_audio, tmp_path):
    from transformers import ASTModel

    sf.write(tmp_path / "a.wav", tone(1.2), SR)
    p = AudioPlugin(pretrained=str(hf_audio / "ast"), log_mel="ast", max_seconds=1.2)
    x = p.preprocess(tmp_path / "a.wav")[None]              # 120 frames; AST takes 100
    enc = p.build_encoder()
    assert (enc.num_tokens, enc.hidden_size) == (12, 32)      # 2 x 6 patches, CLS+dist dropped
    ref = ASTModel.from_pretrained(hf_audio / "ast")
    with torch.no_grad():
        want = ref(input_values=x[..., :100].transpose(1, 2)).last_hidden_state[:, 2:]
        assert torch.allclose(enc(x), want, atol=1e-5)


def test_pretrained_whisper(hf_audio, tmp_path):
    sf.write(tmp_path / "a.wav", tone(), SR)
    p = AudioPlugin(pretrained=str(hf_audio / "whisper"), log_mel="whisper", token_pool=2)
    enc = p.build_encoder()
    assert (enc.num_tokens, enc.hidden_size) == (25, 32)      # 50 positions pooled by 2
    assert enc(p.preprocess(tmp_path / "a.wav")[None]).shape == (1, 25, 32)


def test_pretrained_checks_mels_and_frames(hf_audio):
    with pytest.raises(ValueError, match="n_mels: 32"):
        AudioPlugin(pretrained=str(hf_audio / "whisper"), n_mels=80).build_encoder()
    with pytest.raises(ValueError, match="max_seconds"):
        AudioPlugin(pretrained=str(hf_audio / "whisper"), max_seconds=0.5).build_encoder()

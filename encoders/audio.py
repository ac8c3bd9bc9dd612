"""Audio modality: WAV / FLAC / OGG / MP3 (soundfile) -> log-mel ``[n_mels, frames]`` -> tokens.

Preprocessing:

1. read with soundfile (float32); multi-channel audio is mixed down to mono (channel mean);
2. crop to the first ``max_seconds`` (the start is kept) and resample to ``sample_rate`` with
   ``librosa.resample`` (another sample rate is *not* an error);
3. pad with silence (zeros) at the end up to exactly ``max_seconds``;
4. ``librosa.feature.melspectrogram`` (``n_fft``, ``hop_length``, ``n_mels``, ``fmin``, ``fmax``,
   power 2) then the log scale ``log_mel``:

   * ``"db"`` (default): ``librosa.power_to_db(ref=1.0, top_db=top_db)``, then
     ``(x - db_mean) / db_std``. The reference is absolute, so loudness is kept.
   * ``"whisper"``: Whisper's ``log10``, floor at max - 8, ``(x + 4) / 4`` (reflect padding).
   * ``"ast"``: natural log of HTK-scale, unnormalised mel energies, ``(x + 4.27) / 9.14`` -- an
     approximation of the Kaldi fbank the AST checkpoints were trained on.

5. exactly ``frames = round(max_seconds * sample_rate) // hop_length`` frames are kept (the last
   centred frame is dropped, as Whisper does): defaults give ``[32, 100]``.

Bad input -> :class:`ModalityInputError`: missing / empty / truncated / non-audio file (soundfile
cannot decode it), zero-length audio, NaN or infinite samples.

Encoder input is the stacked batch ``[B, n_mels, frames]``:

* tiny (``pretrained: null``): a Whisper-like patch embedding (``Conv1d(n_mels, hidden_size,
  kernel=stride=patch_frames)``: one token per ``patch_frames`` frames, 100 ms by default, a frame
  remainder is dropped), a CLS token, fixed-initialised sin-cos time positions and ``layers``
  transformer blocks -> defaults: 10 tokens of width 64.
* ``pretrained: <hub id | dir>``: chosen by the checkpoint's ``model_type``:
  ``audio-spectrogram-transformer`` -> ``ASTModel`` (input transposed to ``[B, frames, n_mels]``,
  ``n_mels == num_mel_bins`` (128), at least ``max_length`` (1024) frames: ``max_seconds: 10.24``,
  ``log_mel: ast``, ``fmin: 20``; ``"patch"`` drops its CLS + distillation tokens) or ``whisper`` ->
  ``WhisperModel.get_encoder()`` (``n_mels`` 80 or 128 as the checkpoint, exactly
  ``2 * max_source_positions`` = 3000 frames: ``max_seconds: 30``, ``log_mel: whisper``; 1500
  tokens, pool them with ``token_pool``). The preprocessing options must match the checkpoint; the
  encoder checks ``n_mels`` and the frame count at build time and crops extra frames.

``select_layer`` indexes ``hidden_states``; ``null`` is the model's final output (a pretrained
model's ``last_hidden_state``, after AST's / Whisper's final LayerNorm; the tiny tower's last
block). ``token_pool`` average-pools the output tokens by that stride (1 = off).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from encoders._common import (check_choice, check_file, check_positive_int, describe_exc,
                              finish_encoder, require, seeded)
from encoders._transformer import Transformer, init_weights, select_hidden, sincos_1d
from mil_plugins.modality import ModalityEncoder, ModalityInputError, ModalityPlugin

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au")
AST_MEAN, AST_STD = -4.2677393, 4.5689974 * 2


def _wav_truncation(extra_info: str) -> str | None:
    """libsndfile's log says ``data : <declared> (should be <present>)`` for a cut WAV file."""
    m = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", extra_info or "", re.MULTILINE)
    if not m:
        return None
    declared, present = int(m.group(1)), int(m.group(2))
    # streaming writers leave the size at 0 or 0xFFFFFFFF: not a truncation
    if present < declared < 0xFFFFFF00:
        return f"the WAV header declares {declared} data bytes but only {present} are present"
    return None


class TinyAudioTransformer(nn.Module):
    """``[B, n_mels, frames] -> [B, T, D]``; see the module docstring."""

    def __init__(self, *, n_mels: int, frames: int, patch_frames: int, hidden_size: int,
                 layers: int, heads: int, mlp_ratio: float, select_layer: int, select_feature: str):
        super().__init__()
        self.n_mels, self.frames, self.patch_frames = n_mels, frames, patch_frames
        n = frames // patch_frames
        self.hidden_size = hidden_size
        self.num_prefix = 1 if select_feature == "cls_patch" else 0
        self.num_tokens = n + self.num_prefix
        self.select_layer = select_layer
        self.patch_embed = nn.Conv1d(n_mels, hidden_size, patch_frames, stride=patch_frames)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(sincos_1d(n, hidden_size)[None])
        self.transformer = Transformer(hidden_size, layers, heads, mlp_ratio)
        init_weights(self.transformer)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.transformer.resolve(select_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.n_mels, self.frames):
            raise ValueError(f"expected [B, {self.n_mels}, {self.frames}], got {list(x.shape)}")
        tokens = self.patch_embed(x).transpose(1, 2) + self.pos_embed
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1)
        out = self.transformer(tokens, self.select_layer)
        return out if self.num_prefix else out[:, 1:]


class HFAudioTower(nn.Module):
    """A pretrained AST or Whisper encoder taking our ``[B, n_mels, frames]`` log-mels."""

    def __init__(self, pretrained: str, *, n_mels: int, frames: int, select_layer: int | None,
                 select_feature: str, modality: str):
        super().__init__()
        import transformers

        config = transformers.AutoConfig.from_pretrained(pretrained)
        self.kind = getattr(config, "model_type", "")
        if self.kind == "audio-spectrogram-transformer":
            self.model = transformers.ASTModel.from_pretrained(pretrained)
            self.expected_frames, self.prefix = int(config.max_length), 2
        elif self.kind == "whisper":
            self.model = transformers.WhisperModel.from_pretrained(pretrained).get_encoder()
            self.expected_frames, self.prefix = 2 * int(config.max_source_positions), 0
        else:
            raise ValueError(f"modality {modality!r}: pretrained {pretrained} has model_type "
                             f"{self.kind!r}; supported: 'audio-spectrogram-transformer' (AST), "
                             f"'whisper'")
        self.model.eval()
        if int(config.num_mel_bins) != n_mels:
            raise ValueError(f"modality {modality!r}: {pretrained} takes {config.num_mel_bins} mel "
                             f"bins; set the option n_mels: {config.num_mel_bins} (it is {n_mels})")
        if frames < self.expected_frames:
            raise ValueError(
                f"modality {modality!r}: {pretrained} takes {self.expected_frames} frames; the "
                f"preprocessing gives {frames} (raise max_seconds, or check hop_length)")
        self.select_layer = select_layer
        with torch.no_grad():
            probe = self._hidden(torch.zeros(1, n_mels, self.expected_frames))
        self.num_prefix = self.prefix if select_feature == "cls_patch" else 0
        self.num_tokens = int(probe.shape[1]) - self.prefix + self.num_prefix
        self.hidden_size = int(probe.shape[-1])

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        x = x[..., : self.expected_frames].to(param.device, param.dtype)
        if self.kind == "whisper":
            out = self.model(input_features=x, output_hidden_states=True)
        else:
            out = self.model(input_values=x.transpose(1, 2), output_hidden_states=True)
        if self.select_layer is None:
            return out.last_hidden_state
        return select_hidden(out, self.select_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._hidden(x)
        if not self.num_prefix:
            h = h[:, self.prefix:]
        return h.to(x.dtype)


class AudioEncoder(ModalityEncoder):
    """``[B, n_mels, frames] -> [B, T, D]``: a tower, then optional token average pooling."""

    def __init__(self, tower: nn.Module, token_pool: int):
        super().__init__()
        self.tower = tower
        self.token_pool = token_pool
        self.hidden_size = int(tower.hidden_size)
        patches = tower.num_tokens - tower.num_prefix
        self.num_tokens = tower.num_prefix + (math.ceil(patches / token_pool) if token_pool > 1
                                              else patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tower(x)
        if self.token_pool > 1:
            k = self.tower.num_prefix
            pooled = F.avg_pool1d(h[:, k:].transpose(1, 2), self.token_pool, self.token_pool,
                                  ceil_mode=True).transpose(1, 2)
            h = torch.cat([h[:, :k], pooled], 1)
        return h


class AudioPlugin(ModalityPlugin):
    name = "audio"
    key = "audio"
    placeholder = "<audio>"
    default_projector = "mlp2x_gelu"
    extensions = AUDIO_EXTENSIONS
    default_options: dict[str, Any] = {
        "sample_rate": 16000,
        "max_seconds": 1.0,       # crop (keep the start) / pad with silence (at the end) to this
        "n_fft": 400,             # 25 ms window at 16 kHz
        "win_length": None,       # null: n_fft
        "hop_length": 160,        # 10 ms hop
        "n_mels": 32,
        "fmin": 0.0,
        "fmax": None,             # null: sample_rate / 2
        "log_mel": "db",          # "db" | "whisper" | "ast"
        "top_db": 80.0,           # "db": floor at max - top_db (null: no floor)
        "db_mean": -50.0,         # "db": (x - db_mean) / db_std
        "db_std": 25.0,
        "res_type": "soxr_hq",    # librosa.resample method
        "patch_frames": 10,       # tiny: frames per token
        "hidden_size": 64,        # tiny only
        "layers": 2,              # tiny only
        "heads": 4,               # tiny only
        "mlp_ratio": 2.0,         # tiny only
        "token_pool": 1,          # average-pool output tokens by this stride (1 = off)
        "pretrained": None,       # null | AST or Whisper hub id / local dir
        "select_layer": None,     # null: the final output (last_hidden_state)
        "select_feature": "patch",  # "patch" | "cls_patch"
        "trainable": False,
        "init_seed": 0,
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        check_positive_int(o, ("sample_rate", "n_fft", "hop_length", "n_mels", "patch_frames",
                               "hidden_size", "layers", "heads", "token_pool"), self.name)
        check_choice(o, "log_mel", ("db", "whisper", "ast"), self.name)
        check_choice(o, "select_feature", ("patch", "cls_patch"), self.name)
        require(float(o["max_seconds"]) > 0, self.name, "max_seconds must be > 0")
        require(float(o["db_std"]) > 0, self.name, "db_std must be > 0")
        require(self.frames >= o["patch_frames"] or bool(o["pretrained"]), self.name,
                f"{self.frames} frames is fewer than patch_frames {o['patch_frames']}")
        require(o["hidden_size"] % o["heads"] == 0 or bool(o["pretrained"]), self.name,
                f"hidden_size {o['hidden_size']} is not divisible by heads {o['heads']}")

    @property
    def num_samples(self) -> int:
        return int(round(float(self.options["max_seconds"]) * self.options["sample_rate"]))

    @property
    def frames(self) -> int:
        return self.num_samples // self.options["hop_length"]

    # ---- preprocessing --------------------------------------------------------------------------
    def load_waveform(self, path: str | Path) -> np.ndarray:
        """Mono float32 waveform at ``sample_rate``, exactly ``max_seconds`` long."""
        import soundfile as sf

        p = check_file(path, self.name)
        try:
            with sf.SoundFile(str(p)) as f:
                sr = f.samplerate
                keep = int(math.ceil(float(self.options["max_seconds"]) * sr))
                truncated = _wav_truncation(f.extra_info)
                data = f.read(frames=keep, dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile.LibsndfileError, RuntimeError, ...
            raise ModalityInputError(
                path, f"not an audio file soundfile can decode ({describe_exc(exc)}); expected "
                      f"one of {', '.join(AUDIO_EXTENSIONS)}", self.name) from None
        if truncated:
            raise ModalityInputError(path, f"truncated file: {truncated}", self.name)
        if data.shape[0] == 0:
            raise ModalityInputError(path, "zero-length audio (0 samples)", self.name)
        bad = int(np.size(data) - np.isfinite(data).sum())
        if bad:
            what = "all samples are" if bad == data.size else f"{bad} of {data.size} samples are"
            raise ModalityInputError(path, f"{what} NaN or infinite", self.name)
        y = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
        target = self.options["sample_rate"]
        if sr != target:
            import librosa

            y = librosa.resample(y, orig_sr=sr, target_sr=target, res_type=self.options["res_type"])
        n = self.num_samples
        y = y[:n] if len(y) >= n else np.pad(y, (0, n - len(y)))
        return np.ascontiguousarray(y, dtype=np.float32)

    def log_mel(self, y: np.ndarray) -> np.ndarray:
        """Waveform at ``sample_rate`` -> float32 ``[n_mels, frames]`` (see the module doc)."""
        import librosa

        o = self.options
        mode = o["log_mel"]
        mel = librosa.feature.melspectrogram(
            y=y, sr=o["sample_rate"], n_fft=o["n_fft"], hop_length=o["hop_length"],
            win_length=o["win_length"], n_mels=o["n_mels"], fmin=o["fmin"], fmax=o["fmax"],
            power=2.0, pad_mode="reflect" if mode == "whisper" else "constant",
            htk=mode == "ast", norm=None if mode == "ast" else "slaney")
        mel = mel[:, : self.frames]
        if mode == "db":
            x = librosa.power_to_db(mel, ref=1.0, top_db=o["top_db"])
            x = (x - o["db_mean"]) / o["db_std"]
        elif mode == "whisper":
            x = np.log10(np.maximum(mel, 1e-10))
            x = (np.maximum(x, x.max() - 8.0) + 4.0) / 4.0
        else:
            x = (np.log(np.maximum(mel, np.finfo(np.float32).eps)) - AST_MEAN) / AST_STD
        return np.ascontiguousarray(x, dtype=np.float32)

    def preprocess(self, path: str | Path) -> torch.Tensor:
        """Audio file -> float32 ``[n_mels, frames]``."""
        return torch.from_numpy(self.log_mel(self.load_waveform(path)))

    # ---- encoder --------------------------------------------------------------------------------
    def build_encoder(self) -> AudioEncoder:
        o = self.options
        sel = o["select_layer"]
        with seeded(o["init_seed"]):
            if o["pretrained"]:
                tower = HFAudioTower(str(o["pretrained"]), n_mels=o["n_mels"], frames=self.frames,
                                     select_layer=sel, select_feature=o["select_feature"],
                                     modality=self.name)
            else:
                tower = TinyAudioTransformer(
                    n_mels=o["n_mels"], frames=self.frames, patch_frames=o["patch_frames"],
                    hidden_size=o["hidden_size"], layers=o["layers"], heads=o["heads"],
                    mlp_ratio=o["mlp_ratio"], select_layer=-1 if sel is None else sel,
                    select_feature=o["select_feature"])
            encoder = AudioEncoder(tower, o["token_pool"])
        return finish_encoder(encoder, o)

"""Audio renderer: one to three beeps of a low or a high tone, saved as a 16 kHz mono PCM_16 WAV.

Scene attributes: ``pitch`` (low ~300 Hz, high ~1500 Hz, each jittered by up to +-8%) and ``count``
(one/two/three beeps). 1 s of audio; each beep lasts 120-160 ms with 10 ms raised-cosine ramps,
beeps are separated by 90-150 ms of near-silence, and the group starts at a random offset. Every
beep carries a weak second harmonic; a little white noise covers the whole clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import soundfile as sf

EXT = ".wav"
SAMPLE_RATE = 16_000
DURATION = 1.0
PITCH_HZ = {"low": 300.0, "high": 1500.0}
N_BEEPS = {"one": 1, "two": 2, "three": 3}
RAMP = 0.010


def beep_times(count: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """(start, length) in seconds of ``count`` beeps that fit in the clip."""
    lengths = rng.uniform(0.12, 0.16, count)
    gaps = rng.uniform(0.09, 0.15, max(count - 1, 0))
    total = lengths.sum() + gaps.sum()
    t = float(rng.uniform(0.03, DURATION - 0.03 - total))
    out = []
    for i in range(count):
        out.append((t, float(lengths[i])))
        t += lengths[i] + (gaps[i] if i < count - 1 else 0.0)
    return out


def render_wave(attrs: Mapping[str, str], rng: np.random.Generator) -> np.ndarray:
    """float32 [SAMPLE_RATE * DURATION] in [-1, 1]."""
    n = int(SAMPLE_RATE * DURATION)
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    freq = PITCH_HZ[attrs["pitch"]] * rng.uniform(0.92, 1.08)
    wave = rng.normal(0, 0.004, n)
    for start, length in beep_times(N_BEEPS[attrs["count"]], rng):
        i0, i1 = int(start * SAMPLE_RATE), int((start + length) * SAMPLE_RATE)
        seg = t[i0:i1] - t[i0]
        env = np.ones(i1 - i0)
        k = int(RAMP * SAMPLE_RATE)
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, k))
        env[:k], env[-k:] = ramp, ramp[::-1]
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(0.35, 0.6)
        tone = np.sin(2 * np.pi * freq * seg + phase) + 0.15 * np.sin(4 * np.pi * freq * seg + phase)
        wave[i0:i1] += amp * env * tone / 1.15
    return np.clip(wave, -1, 1).astype(np.float32)


def render(attrs: Mapping[str, str], rng: np.random.Generator, path: Path) -> None:
    sf.write(str(path), render_wave(attrs, rng), SAMPLE_RATE, subtype="PCM_16", format="WAV")

"""Video renderer: one shape moving left, right, up or down, saved as a short H.264/MPEG-4 MP4.

Scene attributes: ``shape`` (circle/square/triangle), ``color`` (red/green/blue), ``direction``
(left/right/up/down). 8 frames of 32x32 at 8 fps (1 s), yuv420p. The shape crosses about a third
of the frame between the first and the last frame; start point, size, rotation, colour tone and
the background are jittered, and the background noise changes from frame to frame.

Codec: ``libx264`` (CRF 12, tune zerolatency, single-threaded: reproducible) when PyAV's FFmpeg
has it, else FFmpeg's ``mpeg4`` at a fixed high quality. Containers may embed encoder metadata; the
decoded frames are what is guaranteed to be identical for a seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import av
import numpy as np

from .image import background, jitter_color, shape_mask

EXT = ".mp4"
SIZE = 32
FRAMES = 8
FPS = 8
TRAVEL = 0.34         # fraction of the frame crossed between the first and the last frame

_MOTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def render_frames(attrs: Mapping[str, str], rng: np.random.Generator, size: int = SIZE,
                  frames: int = FRAMES) -> np.ndarray:
    """uint8 [frames, size, size, 3]."""
    r = rng.uniform(0.16, 0.19) * size
    dx, dy = _MOTION[attrs["direction"]]
    travel = TRAVEL * size
    # centre of the path: the moving axis near the middle, the other axis anywhere that fits
    along = size / 2 + rng.uniform(-0.03, 0.03) * size
    across = float(rng.uniform(r * 1.6, size - r * 1.6))
    cx0, cy0 = (along, across) if dx else (across, along)
    angle = float(rng.uniform(-0.25, 0.25))
    color = jitter_color(attrs["color"], rng)
    bg = background(rng, (size, size), noise=0.0)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for f in range(frames):
        t = f / (frames - 1) - 0.5
        cx, cy = cx0 + dx * travel * t, cy0 + dy * travel * t
        alpha = shape_mask(attrs["shape"], cx, cy, r, angle, size)[..., None]
        noisy = bg + rng.normal(0, 4.0, bg.shape).astype(np.float32)
        out[f] = np.clip(np.rint(noisy * (1 - alpha) + color * alpha), 0, 255).astype(np.uint8)
    return out


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> planar yuv420p [H * 3 / 2, W] (BT.601 limited range, 2x2 chroma mean).

    Done here rather than by FFmpeg's swscale, so the encoder's input is exactly reproducible.
    """
    x = rgb.astype(np.float64) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    h, w = y.shape

    def sub(c):
        return c.reshape(h // 2, 2, w // 2, 2).mean((1, 3)).reshape(h // 4, w)

    def q(c):
        return np.clip(np.rint(c), 0, 255).astype(np.uint8)

    return np.concatenate([q(y), q(sub(cb)), q(sub(cr))], 0)


def write_mp4(frames: np.ndarray, path: Path, fps: int = FPS) -> None:
    """Encode uint8 RGB frames [T, H, W, 3] single-threaded, so the output is reproducible."""
    name = codec()
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(name, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        ctx = stream.codec_context
        ctx.thread_count = 1
        if name == "libx264":
            # tune=zerolatency: no lookahead, no B-frames. With the lookahead (preset medium alone)
            # x264 gave different bitstreams for the same 32x32 frames now and then.
            stream.options = {"crf": "12", "preset": "medium", "tune": "zerolatency",
                              "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0"}
        else:
            ctx.qmin = ctx.qmax = 2
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(arr), format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_frames(path: str | Path) -> np.ndarray:
    """Decode every frame of ``path`` as uint8 RGB [T, H, W, 3]."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def render(attrs: Mapping[str, str], rng: np.random.Generator, path: Path) -> None:
    write_mp4(render_frames(attrs, rng), path)

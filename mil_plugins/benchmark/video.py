"""Video renderer: one shape moving left, right, up or down, saved as a short H.264/MPEG-4 MP4.

Scene attributes: ``shape`` (circle/square/triangle), ``color`` (red/green/blue), ``direction``
(left/right/up/down). 8 frames of 32x32 at 8 fps (1 s), yuv420p. The shape crosses about a third of the
frame between the first and the last frame; start point, size, rotation, colour tone and the
background are jittered, and the background noise changes from frame to frame.

Codec: ``libx264`` (CRF 12, one thread, deterministic) when PyAV's FFmpeg has it, else FFmpeg's
``mpeg4`` at a fixed high quality. Containers may embed encoder metadata; the decoded frames are what
is deterministic.
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


def write_mp4(frames: np.ndarray, path: Path, fps: int = FPS) -> None:
    name = codec()
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(name, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if name == "libx264":
            stream.options = {"crf": "12", "preset": "medium", "threads": "1"}
        else:
            stream.codec_context.qmin = stream.codec_context.qmax = 2
            stream.thread_count = 1
        for arr in frames:
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
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

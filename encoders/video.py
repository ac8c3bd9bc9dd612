"""Video modality: MP4 / WebM / AVI / MKV / MOV (PyAV) or a folder of frames -> ``[F, 3, S, S]``.

Frame sampling: the ``n`` decodable frames are split into ``num_frames`` equal segments and the
middle frame of each is taken, index ``floor((i + 0.5) * n / num_frames)`` (TSN-style uniform
sampling). A video with fewer than ``min_frames`` (default 2) frames is an error; one with
``min_frames <= n < num_frames`` frames is sampled *with repetition* by the same formula (e.g. 2
frames, 4 requested -> frames 0, 0, 1, 1). Each frame gets the image plugin's preprocessing
(RGB, shorter side resized, centre crop, CLIP mean/std). A frame folder holds image files
(``.png/.jpg/...``) in natural order (``f2.png`` before ``f10.png``); other files are ignored.

Encoder: the image tower (tiny timm / CLIP, a timm id or pretrained; the image modality's options) on every
frame, the patch grid average-pooled by ``spatial_pool`` (2 -> 2x2 pooling, as LLaVA-NeXT-Video;
1 -> off), then ``temporal``:

* ``"concat"`` (default): the frames' tokens one after the other, ``F * T`` tokens. Keeps frame
  order, hence motion direction.
* ``"mean"``: mean over frames, ``T`` tokens. Cheaper, but blind to frame order (a ball moving
  left-to-right and right-to-left give the same features).

Defaults (tiny): 4 frames of 32x32, 8x8 patches -> 4x4 grid -> pooled 2x2 -> 4 tokens per frame,
concatenated -> 16 tokens of width 64.

Bad input -> :class:`ModalityInputError`: missing / empty file, a file without a video stream (for
example audio), undecodable or truncated data, fewer than ``min_frames`` frames, an empty folder
or an unreadable frame image in a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from encoders._common import (IMAGE_EXTENSIONS, check_choice, check_file, check_positive_int,
                              check_vit_options, describe_exc, finish_encoder, image_tensor,
                              natural_key, open_image, require, seeded)
from encoders._towers import build_vision_tower, library_versions, pooled_grid, spatial_pool
from encoders.image import VIT_OPTIONS
from mil_plugins.modality import ModalityEncoder, ModalityInputError, ModalityPlugin

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".gif")


def sample_indices(n: int, num_frames: int) -> list[int]:
    """Middle frame of each of ``num_frames`` equal segments of ``n`` frames (repeats if n < F)."""
    return [min(n - 1, int((i + 0.5) * n / num_frames)) for i in range(num_frames)]


class VideoEncoder(ModalityEncoder):
    """``[B, F, 3, S, S] -> [B, F * T, D]`` (``concat``) or ``[B, T, D]`` (``mean``)."""

    def __init__(self, tower: torch.nn.Module, num_frames: int, temporal: str, spatial_pool: int):
        super().__init__()
        self.tower = tower
        self.num_frames = num_frames
        self.temporal = temporal
        self.pool = spatial_pool
        gh, gw = pooled_grid(tower.grid, spatial_pool)
        per_frame = gh * gw + tower.num_prefix
        self.tokens_per_frame = per_frame
        self.hidden_size = int(tower.hidden_size)
        self.num_tokens = per_frame * (num_frames if temporal == "concat" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected [B, F, 3, S, S], got {list(x.shape)}")
        b, f = x.shape[:2]
        tokens = self.tower(x.flatten(0, 1))                       # [B*F, T, D]
        tokens = spatial_pool(tokens, self.tower.grid, self.tower.num_prefix, self.pool)
        tokens = tokens.view(b, f, tokens.shape[1], tokens.shape[2])
        if self.temporal == "mean":
            return tokens.mean(1)
        return tokens.flatten(1, 2)


class VideoPlugin(ModalityPlugin):
    name = "video"
    key = "video"
    placeholder = "<video>"
    default_projector = "mlp2x_gelu"
    extensions = VIDEO_EXTENSIONS + ("<folder of frames>",)
    default_options: dict[str, Any] = {
        **VIT_OPTIONS,
        "num_frames": 4,        # frames sampled per video (F)
        "min_frames": 2,        # fewer decodable frames -> ModalityInputError
        "temporal": "concat",   # "concat" (F*T tokens, keeps order) | "mean" (T tokens)
        "spatial_pool": 2,      # average-pool the patch grid per frame (1 = off)
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        check_vit_options(o, self.name)
        check_positive_int(o, ("num_frames", "min_frames", "spatial_pool"), self.name)
        check_choice(o, "temporal", ("concat", "mean"), self.name)
        require(o["min_frames"] <= o["num_frames"], self.name,
                f"min_frames {o['min_frames']} > num_frames {o['num_frames']}")

    @property
    def version(self) -> str:  # the towers' code is timm's / transformers': their versions count
        return f"1;{library_versions()}"

    # ---- preprocessing --------------------------------------------------------------------------
    def preprocess(self, path: str | Path) -> torch.Tensor:
        """Video file or frame folder -> float32 ``[num_frames, 3, image_size, image_size]``."""
        p = check_file(path, self.name, allow_dir=True)
        frames = self._folder(p) if p.is_dir() else self._decode(p)
        return torch.stack(frames, 0)

    def _too_few(self, path: Path, n: int, what: str) -> ModalityInputError:
        return ModalityInputError(
            path, f"only {n} decodable {what}; at least min_frames={self.options['min_frames']} "
                  f"are needed", self.name)

    def _folder(self, folder: Path) -> list[torch.Tensor]:
        files = sorted((f for f in folder.iterdir()
                        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS),
                       key=lambda f: natural_key(f.name))
        if not files:
            raise ModalityInputError(folder, f"frame folder holds no image files "
                                             f"({', '.join(IMAGE_EXTENSIONS)})", self.name)
        if len(files) < self.options["min_frames"]:
            raise self._too_few(folder, len(files),
                                "frame image" if len(files) == 1 else "frame images")
        picked = sample_indices(len(files), self.options["num_frames"])
        cache: dict[int, torch.Tensor] = {}
        for i in picked:
            if i not in cache:
                try:
                    cache[i] = image_tensor(open_image(files[i], self.name, "frame image"),
                                            self.options)
                except ModalityInputError as exc:
                    raise ModalityInputError(folder, f"frame {files[i].name}: {exc.problem}",
                                             self.name) from None
        return [cache[i] for i in picked]

    def _open(self, path: Path):
        import av

        try:
            container = av.open(str(path))
        except Exception as exc:
            raise ModalityInputError(
                path, f"not a video file PyAV can read ({describe_exc(exc)}); expected one of "
                      f"{', '.join(VIDEO_EXTENSIONS)} or a folder of frames", self.name) from None
        fmt = container.format.name or ""
        if fmt.endswith("_pipe") or fmt == "image2":
            container.close()
            raise ModalityInputError(path, f"is a still image ({fmt.removesuffix('_pipe')}), not a "
                                           f"video; use the image modality or a folder of frames",
                                     self.name)
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            container.close()
            if "audio" in kinds:
                problem = "has audio but no video stream (an audio file?)"
            else:
                problem = (f"no video stream found (streams: {', '.join(kinds) or 'none'}); the "
                           f"file is truncated, corrupt or not a video")
            raise ModalityInputError(path, problem, self.name)
        return container

    def _decode(self, path: Path) -> list[torch.Tensor]:
        """Decode ``path`` once, converting only the sampled frames.

        Which frames to sample depends on the frame count: taken from the container's index
        (``stream.frames``), else from counting video packets (demuxing, no decoding). Both are
        checked against the frames actually decoded; a wrong guess costs a second decoding pass.
        """
        container = self._open(path)
        count = int(container.streams.video[0].frames or 0)
        if count <= 0:
            container.close()
            container = self._open(path)
            try:
                stream = container.streams.video[0]
                count = sum(1 for pkt in container.demux(stream) if pkt.size)
            except Exception:
                count = 0
            container.close()
            container = self._open(path)
        picked = sample_indices(count, self.options["num_frames"]) if count else []
        frames, n = self._decode_pass(path, container, set(picked))
        if n < self.options["min_frames"]:
            raise self._too_few(path, n, "frame" if n == 1 else "frames")
        if n != count:  # the count was wrong: sample again on the true count
            picked = sample_indices(n, self.options["num_frames"])
            if not set(picked) <= set(frames):
                frames, _ = self._decode_pass(path, self._open(path), set(picked))
        return [frames[i] for i in picked]

    def _decode_pass(self, path: Path, container,
                     wanted: set[int]) -> tuple[dict[int, torch.Tensor], int]:
        """Decode every frame; preprocess those in ``wanted``. Returns them and the frame count.

        Closes ``container``.
        """
        from av.video.reformatter import VideoReformatter

        out: dict[int, torch.Tensor] = {}
        n = 0
        # one reformatter keeps its swscale context across frames: ~10x cheaper per frame than
        # frame.to_image() / to_ndarray(format=...), which set one up every call
        reformatter = VideoReformatter()
        try:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if n in wanted:
                    rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
                    out[n] = image_tensor(Image.fromarray(rgb), self.options)
                n += 1
        except Exception as exc:
            raise ModalityInputError(
                path, f"video data is corrupt or truncated: decoding failed after {n} frame(s) "
                      f"({describe_exc(exc)})", self.name) from None
        finally:
            container.close()
        return out, n

    # ---- encoder --------------------------------------------------------------------------------
    def build_encoder(self) -> VideoEncoder:
        o = self.options
        with seeded(o["init_seed"]):
            tower = build_vision_tower(o, 3, self.name)
            encoder = VideoEncoder(tower, o["num_frames"], o["temporal"], o["spatial_pool"])
        return finish_encoder(encoder, o)

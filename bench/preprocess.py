"""Per-core throughput of the built-in modality preprocessors, next to the library call they wrap.

    python bench/preprocess.py [--seconds 0.4] [--keep DIR]

Writes a few files of each modality into a temporary folder (Pillow, PyAV, soundfile, numpy,
open3d), then times, on one thread:

* each plugin's ``preprocess(path)`` against the plain library call at its core (Pillow open +
  resize, PyAV decode of every frame, ``librosa.feature.melspectrogram`` on the loaded array,
  Pillow open of a 16-bit PNG, ``open3d.io.read_point_cloud``), printing the ratio
  ``ours / baseline``: machines differ, ratios travel better than absolute times;
* the feature cache (:mod:`mil_plugins.cache`): a hit (hash the file, load safetensors) against a
  recompute (preprocess + tiny encoder forward), printing ``recompute / hit``.

Each pair is measured by alternating the two calls for ``--seconds`` (at least 5 each) and taking
the medians, so that load from other processes affects both sides alike.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")   # per-core numbers: before numpy / torch are imported

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, installed or not

from encoders.audio import AudioPlugin  # noqa: E402
from encoders.depth import DepthPlugin  # noqa: E402
from encoders.image import ImagePlugin  # noqa: E402
from encoders.point import PointCloudPlugin  # noqa: E402
from encoders.video import VideoPlugin  # noqa: E402
from mil_plugins.cache import FeatureCache, cached_encode, encoder_fingerprint  # noqa: E402


def paired_medians(a: Callable[[], object], b: Callable[[], object],
                   budget: float) -> tuple[float, float]:
    """Median call times of ``a`` and ``b``, called alternately so that load from other processes
    on the machine hits both alike (the ratio is what is reported)."""
    a(), b()  # warm-up (imports, JIT, file cache)
    ta: list[float] = []
    tb: list[float] = []
    start = time.perf_counter()
    while len(ta) < 5 or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


# ---- test files ---------------------------------------------------------------------------------

def make_files(root: Path) -> dict[str, Path]:
    import av
    import open3d as o3d
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    files: dict[str, Path] = {}
    ramp = np.linspace(0, 200, 640)[None, :, None]
    photo = (rng.random((480, 640, 3)) * 40 + ramp).astype(np.uint8)
    Image.fromarray(photo).save(root / "photo.jpg", quality=90)
    Image.fromarray(photo).save(root / "photo.png")
    files["image jpg 640x480"] = root / "photo.jpg"
    files["image png 640x480"] = root / "photo.png"

    path = root / "clip.mp4"
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=25)
    stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
    for i in range(50):
        frame = np.roll(photo[::4, ::4], i * 3, axis=1)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    files["video mp4 50x160x120"] = path

    t = np.arange(16000) / 16000
    sf.write(root / "tone16k.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    files["audio wav 1s 16k mono"] = root / "tone16k.wav"
    t = np.arange(44100) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], 1)
    sf.write(root / "tone44k.flac", stereo, 44100)
    files["audio flac 1s 44.1k stereo"] = root / "tone44k.flac"

    depth = (1000 + 3000 * rng.random((480, 640))).astype(np.uint16)
    depth[rng.random((480, 640)) < 0.05] = 0
    Image.fromarray(depth).save(root / "depth.png")
    files["depth png16 640x480"] = root / "depth.png"

    xyz = rng.normal(size=(20000, 3))
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    pcd.colors = o3d.utility.Vector3dVector(rng.random((20000, 3)))
    o3d.io.write_point_cloud(str(root / "cloud.ply"), pcd)
    files["point ply 20k pts"] = root / "cloud.ply"
    return files


# ---- baselines: the library call each plugin wraps ----------------------------------------------

def baselines() -> dict[str, Callable[[Path], object]]:
    import av
    import librosa
    import open3d as o3d
    import soundfile as sf
    from PIL import Image

    def pil_open_resize(path: Path):
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((43, 32), Image.Resampling.BICUBIC))

    def av_decode(path: Path):
        with av.open(str(path)) as c:
            return sum(1 for _ in c.decode(video=0))

    loaded: dict[Path, tuple[np.ndarray, int]] = {}

    def mel_on_loaded(path: Path):
        if path not in loaded:   # the array is loaded once: the baseline is the mel call alone
            y, sr = sf.read(str(path), dtype="float32", always_2d=True)
            loaded[path] = (y.mean(1), sr)
        y, sr = loaded[path]
        return librosa.feature.melspectrogram(y=y, sr=sr, n_fft=400, hop_length=160, n_mels=32)

    def pil_open_depth(path: Path):
        with Image.open(path) as im:
            return np.asarray(im)

    def o3d_read(path: Path):
        return np.asarray(o3d.io.read_point_cloud(str(path)).points)

    return {"image": pil_open_resize, "video": av_decode, "audio": mel_on_loaded,
            "depth": pil_open_depth, "point": o3d_read}


BASELINE_NAMES = {"image": "PIL open+convert+resize", "video": "PyAV decode all frames",
                  "audio": "melspectrogram on loaded array", "depth": "PIL open+asarray (I;16)",
                  "point": "open3d read_point_cloud"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.4, help="time budget per measurement")
    ap.add_argument("--keep", type=Path, default=None, help="write the files here (kept)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    tmp = None
    if args.keep:
        root = args.keep
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mil-bench-")
        root = Path(tmp.name)
    try:
        files = make_files(root)
        plugins = {"image": ImagePlugin(), "video": VideoPlugin(), "audio": AudioPlugin(),
                   "depth": DepthPlugin(), "point": PointCloudPlugin()}
        base = baselines()

        print(f"preprocess, one thread, medians of alternating calls for {args.seconds:g} s")
        print(f"{'input':28s} {'ours ms':>9s} {'files/s':>8s} {'base ms':>9s} {'ours/base':>9s}  "
              f"baseline")
        for label, path in files.items():
            modality = label.split()[0]
            plugin = plugins[modality]
            ours, ref = paired_medians(lambda: plugin.preprocess(path),
                                       lambda: base[modality](path), args.seconds)
            print(f"{label:28s} {ours * 1e3:9.2f} {1 / ours:8.1f} {ref * 1e3:9.2f} "
                  f"{ours / ref:9.2f}  {BASELINE_NAMES[modality]}")

        print("\nfeature cache (tiny encoders): hit = hash file + load safetensors; "
              "recompute = preprocess + encoder forward")
        print(f"{'input':28s} {'hit ms':>9s} {'recompute ms':>13s} {'recompute/hit':>14s}")
        cache = FeatureCache(root / "cache", memoize_hashes=False)   # a hit hashes the whole file
        for label in ("image png 640x480", "video mp4 50x160x120", "audio wav 1s 16k mono",
                      "point ply 20k pts"):
            path = files[label]
            plugin = plugins[label.split()[0]]
            encoder = plugin.make_encoder()
            fp = encoder_fingerprint(encoder)

            def recompute():
                with torch.no_grad():
                    return encoder(plugin.preprocess(path)[None])[0]

            cached_encode(cache, plugin, encoder, path, fp)      # fill
            hit, miss = paired_medians(lambda: cached_encode(cache, plugin, encoder, path, fp),
                                       recompute, args.seconds)
            print(f"{label:28s} {hit * 1e3:9.3f} {miss * 1e3:13.2f} {miss / hit:14.1f}")
        print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

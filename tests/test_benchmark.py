"""The built-in benchmark generator: determinism, real file formats, manifest schema, idempotence."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mil_plugins.benchmark import (BENCHMARK_FILE, MODALITIES, PLACEHOLDERS, SIZES, TASKS, VERSION,
                                   answer_vocabulary, bleu4, chance_level, check_sample,
                                   make_benchmark)
from mil_plugins.benchmark.concepts import EXACT_MATCH

SPLITS = ("train", "test")
ALL = list(MODALITIES) + ["text"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Tiny benchmark generated twice (same seed) into two folders; the first run is timed."""
    a, b = tmp_path_factory.mktemp("bench_a"), tmp_path_factory.mktemp("bench_b")
    t0 = time.perf_counter()
    summary = make_benchmark(a, size="tiny", seed=0)
    seconds = time.perf_counter() - t0
    make_benchmark(b, size="tiny", seed=0)
    return a, b, summary, seconds


def load(root: Path, modality: str, split: str) -> list[dict]:
    return json.loads((root / modality / f"{split}.json").read_text(encoding="utf-8"))


def decode(path: Path) -> np.ndarray:
    """Decode a media file with the library a user would use."""
    suffix = path.suffix
    if suffix == ".png":
        with Image.open(path) as im:
            return np.asarray(im)
    if suffix == ".mp4":
        with av.open(str(path)) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    if suffix == ".wav":
        return sf.read(str(path), dtype="int16")[0]
    if suffix == ".ply":
        import open3d as o3d
        pcd = o3d.io.read_point_cloud(str(path))
        return np.concatenate([np.asarray(pcd.points), np.asarray(pcd.colors)], 1)
    raise AssertionError(f"unexpected file {path}")


# -- generation ------------------------------------------------------------------------------------

def test_tiny_generation_is_fast(generated):
    _, _, summary, seconds = generated
    assert summary["generated"] is True
    assert seconds < 20, f"tiny benchmark took {seconds:.1f} s"


def test_layout_and_summary(generated):
    root, _, summary, _ = generated
    meta = json.loads((root / BENCHMARK_FILE).read_text())
    assert (meta["size"], meta["seed"], meta["version"]) == ("tiny", 0, VERSION)
    assert meta["order"] == list(MODALITIES)
    assert meta["modalities"] == ALL
    assert summary["root"] == str(root.resolve())
    for m in ALL:
        for split in SPLITS:
            entry = meta["splits"][m][split]
            assert entry["manifest"] == f"{m}/{split}.json"
            n = SIZES["tiny"][split if m != "text" else f"text_{split}"]
            assert entry["num_samples"] == n == len(load(root, m, split))
    for m in MODALITIES:
        assert set(meta["tasks"][m]) == {t.name for t in TASKS[m]}
        assert meta["media"][m]["placeholder"] == PLACEHOLDERS[m]
    assert set(meta["answer_vocabulary"]) >= {"circle", "red", "left", "up", "high", "three", "near",
                                              "cone"}


def test_deterministic(generated):
    a, b, _, _ = generated
    assert (a / BENCHMARK_FILE).read_bytes() == (b / BENCHMARK_FILE).read_bytes()
    for m in ALL:
        for split in SPLITS:
            assert (a / m / f"{split}.json").read_bytes() == (b / m / f"{split}.json").read_bytes()
    for m in MODALITIES:
        for split in SPLITS:
            for s in load(a, m, split):
                x, y = decode(a / s[m]), decode(b / s[m])
                assert x.shape == y.shape and np.array_equal(x, y), s[m]


def test_other_seed_differs(tmp_path, generated):
    a, _, _, _ = generated
    make_benchmark(tmp_path, size="tiny", seed=1, modalities=["image"])
    assert load(tmp_path, "image", "train") != load(a, "image", "train")


# -- file formats --------------------------------------------------------------------------------

def test_files_open_with_user_libraries(generated):
    root = generated[0]
    for split in SPLITS:
        for s in load(root, "image", split):
            with Image.open(root / s["image"]) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
        for s in load(root, "depth", split):
            with Image.open(root / s["depth"]) as im:
                assert im.format == "PNG" and im.mode in ("I;16", "I")
                d = np.asarray(im)
            assert d.dtype in (np.uint16, np.int32) and d.shape == (64, 64)
            assert 0 < (d == 0).mean() < 0.1            # some invalid pixels, not many
            assert 500 < d[d > 0].min() and d.max() < 6000
        for s in load(root, "video", split):
            with av.open(str(root / s["video"])) as c:
                stream = c.streams.video[0]
                assert stream.codec_context.name in ("h264", "mpeg4")
                frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            assert len(frames) >= 2 and frames[0].shape == (32, 32, 3)
        for s in load(root, "audio", split):
            info = sf.info(str(root / s["audio"]))
            assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            wave, sr = sf.read(str(root / s["audio"]))
            assert sr == 16000 and len(wave) == 16000 and np.abs(wave).max() > 0.2
        import open3d as o3d
        for s in load(root, "point", split):
            pcd = o3d.io.read_point_cloud(str(root / s["point"]))
            assert len(pcd.points) == 512 and pcd.has_colors()


def test_files_are_small(generated):
    root = generated[0]
    for m in MODALITIES:
        for f in (root / m / "files").iterdir():
            assert f.stat().st_size < 40_000, f


# -- manifests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("modality", ALL)
def test_manifest_schema(generated, modality):
    root = generated[0]
    media = None if modality == "text" else modality
    ids = set()
    for split in SPLITS:
        samples = load(root, modality, split)
        assert isinstance(samples, list) and samples
        for s in samples:
            assert check_sample(s, media) == []
            assert s["id"] not in ids
            ids.add(s["id"])
            assert s["id"].startswith(f"{modality}-{split}-")
            if media:
                rel = s[media]
                assert not Path(rel).is_absolute() and rel.startswith(f"{modality}/files/{split}_")
                assert (root / rel).is_file()
                assert s["conversations"][0]["value"].count(PLACEHOLDERS[media]) == 1
            else:
                assert not any(m in s for m in MODALITIES)
                assert "<" not in s["conversations"][0]["value"]
            answer = s["conversations"][1]["value"]
            assert answer.strip() and answer == answer.strip()
            assert set(answer.split()) <= set(answer_vocabulary())
            if s["metric"] == EXACT_MATCH:
                assert answer in s["options"]
                # every option is listed in the question
                question = s["conversations"][0]["value"]
                assert all(o in question for o in s["options"])
            else:
                assert s["metric"] == "bleu4" and len(answer.split()) >= 4


@pytest.mark.parametrize("modality", MODALITIES)
def test_tasks_and_answers_are_balanced(generated, modality):
    root = generated[0]
    for split in SPLITS:
        samples = load(root, modality, split)
        per_task = Counter(s["task"] for s in samples)
        assert set(per_task) == {t.name for t in TASKS[modality]}
        assert max(per_task.values()) - min(per_task.values()) <= 1
        for t in TASKS[modality]:
            answers = Counter(s["conversations"][1]["value"] for s in samples if s["task"] == t.name)
            if t.metric == EXACT_MATCH:
                assert set(answers) == set(t.options), (t.name, answers)
                assert max(answers.values()) - min(answers.values()) <= 1, (t.name, answers)
            else:
                assert len(answers) >= 3              # captions vary


def test_text_split_covers_every_task(generated):
    root = generated[0]
    tasks = Counter(s["task"] for s in load(root, "text", "train"))
    assert set(tasks) == {f"{m}_{t.name}" for m in MODALITIES for t in TASKS[m]}
    assert max(tasks.values()) - min(tasks.values()) <= 1
    # the answer of a QA sample is stated in its prompt
    for s in load(root, "text", "train"):
        if s["metric"] == EXACT_MATCH:
            facts = s["conversations"][0]["value"].split("\n")[0]
            assert s["conversations"][1]["value"] in facts


# -- idempotence -----------------------------------------------------------------------------------

def test_idempotent(generated):
    root = generated[0]
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.json")}
    t0 = time.perf_counter()
    summary = make_benchmark(root, size="tiny", seed=0)
    assert time.perf_counter() - t0 < 1.0
    assert summary["generated"] is False
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.json")} == stamps
    # a subset of what is there is also a no-op
    assert make_benchmark(root, size="tiny", seed=0, modalities=["audio"])["generated"] is False


def test_other_settings_need_overwrite(tmp_path):
    make_benchmark(tmp_path, size="tiny", seed=0, modalities=["audio"])
    first = load(tmp_path, "audio", "train")
    with pytest.raises(FileExistsError, match="overwrite"):
        make_benchmark(tmp_path, size="tiny", seed=1, modalities=["audio"])
    s = make_benchmark(tmp_path, size="tiny", seed=1, modalities=["audio"], overwrite=True)
    assert s["generated"] and s["seed"] == 1 and load(tmp_path, "audio", "train") != first
    # a matching benchmark missing a modality gets just that modality added
    stamp = (tmp_path / "audio" / "train.json").stat().st_mtime_ns
    s = make_benchmark(tmp_path, size="tiny", seed=1, modalities=["audio", "text"])
    assert s["generated"] and s["modalities"] == ["audio", "text"]
    assert (tmp_path / "audio" / "train.json").stat().st_mtime_ns == stamp


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        make_benchmark(tmp_path, size="huge")
    with pytest.raises(ValueError, match="modality"):
        make_benchmark(tmp_path, modalities=["smell"])


# -- metrics ---------------------------------------------------------------------------------------

def test_bleu4_and_chance_levels():
    assert bleu4("a red circle on the left", "a red circle on the left") == pytest.approx(1.0)
    assert bleu4("", "a red circle on the left") == 0.0
    partial = bleu4("a blue circle on the left", "a red circle on the left")
    assert 0 < partial < 1
    for m in MODALITIES:
        for t in TASKS[m]:
            c = chance_level(m, t.name)
            assert 0 < c < 1
            if t.metric == EXACT_MATCH:
                assert c == pytest.approx(1 / len(t.options))


def test_caption_chance_matches_the_evaluators_bleu():
    """Caption chance levels are corpus BLEU-4 as mil_plugins.scoring computes it."""
    scoring = pytest.importorskip("mil_plugins.scoring")
    from mil_plugins.benchmark.concepts import all_scenes, get_task

    for m in MODALITIES:
        caps = [get_task(m, "caption").answer(a) for a in all_scenes(m)]
        preds = [p for p in caps for _ in caps]
        refs = [r for _ in caps for r in caps]
        assert chance_level(m, "caption") == pytest.approx(scoring.bleu4(preds, refs), abs=1e-9)
        assert bleu4(preds[1], refs[1]) == pytest.approx(scoring.bleu4([preds[1]], [refs[1]]))

"""The mixed sequence (MoInCL's setting): per modality a captioning and a QA stage, cut from the
generated benchmark, written by ``make_benchmark(sequence="mixed")`` / ``mil make-benchmark
--sequence mixed`` / ``data.generate.sequence: mixed``, and the recipes of the paper's two orders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mil_plugins.benchmark import make_benchmark
from mil_plugins.benchmark.mixed import (MODALITIES, ORDERS, manifest_path, split_stage_name,
                                         write_mixed_sequence)
from mil_plugins.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    return out, make_benchmark(out, size="tiny", seed=0, sequence="mixed")


def test_stages_split_each_modality_by_task_type(mixed):
    out, summary = mixed
    assert summary["modalities"] == ["image", "video", "audio", "text"]  # no depth / point media
    stages = summary["mixed"]["stages"]
    assert sorted(stages) == sorted(f"{m}_{t}" for m in MODALITIES for t in ("caption", "qa"))
    for name, info in stages.items():
        modality, kind = split_stage_name(name)
        for split in ("train", "test"):
            source = json.loads((out / modality / f"{split}.json").read_text())
            rows = json.loads((out / manifest_path(name, split)).read_text())
            assert info[split]["num_samples"] == len(rows) > 0
            if kind == "caption":
                assert {r["metric"] for r in rows} == {"cider"} and {r["task"] for r in rows} == {"caption"}
                want = [s for s in source if s["metric"] == "bleu4"]
                assert rows == [{**s, "metric": "cider"} for s in want]
            else:
                assert {r["metric"] for r in rows} == {"exact_match"}
                assert rows == [s for s in source if s["metric"] == "exact_match"]
                assert len({r["task"] for r in rows}) == 2
            assert all((out / r[modality]).is_file() for r in rows)  # the benchmark's own media
    # caption and QA stages of a modality partition its manifest
    for m in MODALITIES:
        ids = [r["id"] for k in ("caption", "qa")
               for r in json.loads((out / manifest_path(f"{m}_{k}", "train")).read_text())]
        assert sorted(ids) == sorted(s["id"] for s in json.loads((out / m / "train.json").read_text()))
    meta = json.loads((out / "mixed" / "sequence.json").read_text())
    assert meta["orders"] == {k: list(v) for k, v in ORDERS.items()}
    assert ORDERS["order1"] == ("audio_caption", "image_caption", "video_qa", "audio_qa",
                                "image_qa", "video_caption")
    assert ORDERS["order2"] == ("image_caption", "video_caption", "video_qa", "image_qa",
                                "audio_caption", "audio_qa")


def test_rewrites_nothing_when_unchanged_and_repairs_what_changed(mixed):
    out, _ = mixed
    path = out / manifest_path("audio_qa", "train")
    stamp = path.stat().st_mtime_ns
    again = make_benchmark(out, size="tiny", seed=0, sequence="mixed")
    assert again["generated"] is False and again["mixed"]["written"] == 0
    assert path.stat().st_mtime_ns == stamp
    path.write_text("[]")
    assert write_mixed_sequence(out)["written"] == 1
    assert json.loads(path.read_text())


def test_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="audio/train.json"):
        write_mixed_sequence(tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark sequence"):
        make_benchmark(tmp_path, sequence="zigzag")
    with pytest.raises(ValueError, match="not a mixed-sequence stage"):
        manifest_path("depth_caption", "train")


def test_cli_sequence_mixed(tmp_path):
    out = tmp_path / "bench"
    text = subprocess.run([sys.executable, "-m", "mil_plugins.cli", "make-benchmark", str(out),
                           "--size", "tiny", "--sequence", "mixed"],
                          capture_output=True, text=True, check=True).stdout
    assert "audio_caption train 16, test 8" in text and "video_qa" in text
    assert (out / "mixed" / "image_qa" / "test.json").is_file()
    assert not (out / "depth").exists()


@pytest.mark.parametrize("order", ["order1", "order2"])
@pytest.mark.parametrize("method", ["mixed_{order}_finetune", "mixed_{order}_joint", "moincl_{order}"])
def test_recipes_of_both_orders(order, method):
    recipe = load_recipe(ROOT / "recipes" / "mcl" / f"{method.format(order=order)}.yaml")
    assert [s["name"] for s in recipe["stages"]] == list(ORDERS[order])
    for s in recipe["stages"]:
        assert s["modality"] == split_stage_name(s["name"])[0]
        assert (s["train"], s["test"]) == (manifest_path(s["name"], "train"),
                                           manifest_path(s["name"], "test"))
    assert recipe["data"]["generate"]["sequence"] == "mixed"
    want = {"finetune": "finetune", "joint": "joint", "moincl": "moincl"}
    assert [m["name"] for m in recipe["methods"]] == [
        next(v for k, v in want.items() if k in method)]
    assert recipe["output"]["dir"].startswith(f"runs/mcl-mixed/{order}/")


def test_caption_chance_is_on_the_cider_scale_and_compare_uses_it():
    from mil_plugins.benchmark.concepts import chance_level as modality_chance
    from mil_plugins.benchmark.mixed import chance_level, is_mixed_stage
    from mil_plugins.compare import _chance

    assert is_mixed_stage("audio_qa") and not is_mixed_stage("audio")
    assert chance_level("audio", "pitch") == modality_chance("audio", "pitch") == 0.5
    for m in MODALITIES:
        c = chance_level(m, "caption")
        assert 1.0 < c < 3.0  # well above 0 (template words), far below a perfect 10
    got = _chance({"video_caption": "video", "video": "video"},
                  {"video_caption": ["caption"], "video": ["caption"]})
    assert got["video_caption"]["caption"] == pytest.approx(100 * chance_level("video", "caption"))
    assert got["video"]["caption"] == pytest.approx(100 * modality_chance("video", "caption"))

"""Report files (metrics.json, report.md, two PNGs), run comparison, and atomic writes."""

import json
import math
import os

import pytest

from mil_plugins import atomic as A
from mil_plugins.report import REPORT_FILES, compare_runs, write_report

approx = pytest.approx
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(**over):
    r = {
        "method": "finetune",
        "recipe": "recipes/three_stage.yaml",
        "stages": ["coco", "clotho", "msrvtt"],
        "modalities": ["image", "audio", "video"],
        "accuracy_matrix": [[80.0, None, None], [70.0, 60.0, None], [65.0, 55.0, 50.0]],
        "baseline": [10.0, 5.0, 3.0],
        "trainable_parameters": [4_200_000, 4_200_000, 1_000_000],
        "seconds": [30.5, 90.0, 3700.0],
        "per_task": {"coco": {"caption": 65.0}, "clotho": {"audio_caption": 55.0}},
    }
    r.update(over)
    return r


def test_write_report_files(tmp_path):
    result = _result()
    before = json.dumps(result, sort_keys=True)
    paths = write_report(tmp_path / "run", result)
    assert json.dumps(result, sort_keys=True) == before  # input untouched

    assert set(paths) == set(REPORT_FILES)
    assert sorted(os.listdir(tmp_path / "run")) == sorted(REPORT_FILES.values())  # no tmp files left
    for key in ("accuracy_matrix", "accuracy_curves"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000

    m = json.loads(paths["metrics"].read_text())
    for key in ("stages", "modalities", "accuracy_matrix", "final_average_accuracy",
                "average_incremental_accuracy", "forgetting", "backward_transfer", "forward_transfer",
                "MFT", "MFN", "MAA", "per_stage_forgetting", "trainable_parameters", "seconds",
                "method", "recipe", "baseline", "per_task"):
        assert key in m, key
    # by hand: see tests/test_metrics.py R3
    assert m["final_average_accuracy"] == approx(170 / 3)
    assert m["average_incremental_accuracy"] == approx((80 + 65 + 170 / 3) / 3)
    assert m["forgetting"] == approx(10.0)
    assert m["backward_transfer"] == approx(-10.0)
    assert m["forward_transfer"] is None
    assert m["MFT"] == approx(190 / 3)
    assert m["per_stage_forgetting"] == [approx(15.0), approx(5.0), None]
    assert m["accuracy_matrix"][0] == [80.0, None, None]
    assert m["stages"] == ["coco", "clotho", "msrvtt"]
    assert m["trainable_parameters"] == [4_200_000, 4_200_000, 1_000_000]

    md = paths["report"].read_text()
    assert md.startswith("# Continual-learning report: finetune")
    assert "| after coco | 80.00 | — | — |" in md
    assert "| after msrvtt | 65.00 | 55.00 | 50.00 |" in md
    assert "| untrained (baseline) | 10.00 | 5.00 | 3.00 |" in md
    assert "coco (image)" in md
    assert "| Forgetting | 10.00 |" in md
    assert "| Backward transfer (BWT) | -10.00 |" in md
    assert "4,200,000" in md and "1h 01m 40s" in md
    assert "audio_caption" in md


def test_write_report_overwrites_nan_and_single_stage(tmp_path):
    write_report(tmp_path, _result())
    r = _result(stages=["coco"], modalities=["image"], accuracy_matrix=[[float("nan")]],
                baseline=None, trainable_parameters=[10], seconds=[1.0], per_task=None)
    paths = write_report(tmp_path, r)
    m = json.loads(paths["metrics"].read_text())  # strict JSON: NaN became null
    assert m["accuracy_matrix"] == [[None]]
    assert m["final_average_accuracy"] is None and m["forgetting"] is None
    assert m["stages"] == ["coco"]
    assert sorted(os.listdir(tmp_path)) == sorted(REPORT_FILES.values())
    assert paths["accuracy_matrix"].read_bytes()[:8] == PNG_MAGIC


def test_write_report_unit_scale_and_validation(tmp_path):
    r = _result(accuracy_matrix=[[0.8, None, None], [0.7, 0.6, None]], baseline=None)
    paths = write_report(tmp_path, r)  # partial run: 2 of 3 stages
    md = paths["report"].read_text()
    assert "| after clotho | 0.7000 | 0.6000 | — |" in md
    assert "2 of 3 stages trained" in md
    with pytest.raises(ValueError):
        write_report(tmp_path, _result(modalities=["image"]))
    with pytest.raises(ValueError):
        write_report(tmp_path, _result(accuracy_matrix=[[1.0]] * 4))


def test_compare_runs(tmp_path):
    write_report(tmp_path / "finetune_run", _result())
    write_report(tmp_path / "replay_run", _result(method="replay",
                                                  accuracy_matrix=[[80.0, None, None], [78.0, 60.0, None],
                                                                   [76.0, 58.0, 50.0]]))
    table = compare_runs([tmp_path / "finetune_run" / "metrics.json", tmp_path / "replay_run"])
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run | method |")
    assert lines[2].startswith("| finetune_run | finetune | 56.67 | 10.00 | -10.00 | 9.40M | 1h 03m 40s |")
    # replay: final (76 + 58 + 50)/3 = 61.33; forgetting ((80 - 76) + (60 - 58))/2 = 3; BWT -3
    assert lines[3].startswith("| replay_run | replay | 61.33 | 3.00 | -3.00 |")


# ------------------------------------------------------------------------------------ atomic


def test_atomic_write_json_and_text(tmp_path):
    p = tmp_path / "sub" / "x.json"
    A.atomic_write_json(p, {"b": 1, "a": [math.nan, math.inf, 1.5], "p": tmp_path})
    text = p.read_text()
    assert json.loads(text) == {"b": 1, "a": [None, None, 1.5], "p": str(tmp_path)}
    assert text.index('"b"') < text.index('"a"')  # insertion order kept
    assert "\n  " in text  # indent=2
    A.atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert sorted(os.listdir(tmp_path)) == ["sub", "t.txt"]
    assert os.listdir(tmp_path / "sub") == ["x.json"]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "x.txt"
    A.atomic_write_text(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(A.os, "replace", boom)
    with pytest.raises(OSError):
        A.atomic_write_text(p, "new")
    monkeypatch.undo()
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.txt"]
    with pytest.raises(TypeError):
        A.atomic_write_json(p, {"x": object()})
    assert p.read_text() == "old"


def test_atomic_dir_replaces_and_survives_interruption(tmp_path):
    ckpt = tmp_path / "checkpoints" / "stage1"
    with A.atomic_dir(ckpt) as tmp:
        assert tmp.parent == ckpt.parent and tmp != ckpt
        (tmp / "weights.bin").write_bytes(b"v1")
        A.atomic_write_json(tmp / "meta.json", {"v": 1})
    assert (ckpt / "weights.bin").read_bytes() == b"v1"

    # interrupted: the old content stays, the temp dir is gone
    with pytest.raises(RuntimeError):
        with A.atomic_dir(ckpt) as tmp:
            (tmp / "weights.bin").write_bytes(b"v2-partial")
            raise RuntimeError("killed mid-save")
    assert (ckpt / "weights.bin").read_bytes() == b"v1"
    assert json.loads((ckpt / "meta.json").read_text()) == {"v": 1}
    assert os.listdir(ckpt.parent) == ["stage1"]

    # replaced: new content only, nothing left over
    with A.atomic_dir(ckpt) as tmp:
        (tmp / "weights.bin").write_bytes(b"v2")
    assert sorted(os.listdir(ckpt)) == ["weights.bin"]
    assert (ckpt / "weights.bin").read_bytes() == b"v2"
    assert os.listdir(ckpt.parent) == ["stage1"]


def test_recover_dir_after_crash_between_renames(tmp_path):
    ckpt = tmp_path / "stage1"
    old = tmp_path / ".stage1.old-abc123"
    old.mkdir()
    (old / "weights.bin").write_bytes(b"v1")  # crash after "rename old away", before "rename new in"
    assert A.recover_dir(ckpt) is True
    assert (ckpt / "weights.bin").read_bytes() == b"v1"
    assert os.listdir(tmp_path) == ["stage1"]
    assert A.recover_dir(ckpt) is False


def test_atomic_save_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"w": base.t(), "w_view": base[0], "b": torch.zeros(2)}  # non-contiguous + shared storage
    p = A.atomic_save_safetensors(tmp_path / "a.safetensors", tensors, {"stage": "coco", "step": 3})
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"stage": "coco", "step": "3"}
        assert torch.equal(f.get_tensor("w"), base.t())
        assert torch.equal(f.get_tensor("w_view"), base[0])
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_skipped_samples_are_reported(tmp_path):
    from mil_plugins.report import write_report

    result = {"stages": ["a"], "modalities": ["image"], "accuracy_matrix": [[50.0]],
              "trainable_parameters": [10], "seconds": [1.0], "method": "finetune",
              "skipped_samples": [{"manifest": "m.json", "id": "s7", "file": "x.png",
                                   "reason": "media file not found"}]}
    write_report(tmp_path, result)
    text = (tmp_path / "report.md").read_text()
    assert "1 bad sample(s) were skipped" in text and "s7" in text and "media file not found" in text

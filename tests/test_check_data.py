"""`mil check-data`: every bad sample listed with id, file and reason; exit code 1, else 0."""

from __future__ import annotations

import io

import pytest
from fake_plugins import conv, fake_modalities, plugins, snd, vec, write_json  # noqa: F401

from mil_plugins.data import DataError, check_manifest, run_check_data


def good(root, sid):
    return {"id": sid, "vec": vec(root, f"{sid}.npy"), "conversations": conv("<vec> what", "a")}


@pytest.fixture
def mixed(tmp_path):
    (tmp_path / "corrupt.npy").write_bytes(b"\x00garbage")
    recs = [
        good(tmp_path, "ok1"),
        {"id": "missing", "vec": "nope.npy", "conversations": conv("<vec> what", "a")},
        {"id": "corrupt", "vec": "corrupt.npy", "conversations": conv("<vec> what", "a")},
        {"id": "count", "vec": "ok1.npy", "conversations": conv("<vec> <vec> what", "a")},
        {"id": "shape", "vec": vec(tmp_path, "short.npy", dim=3),
         "sound": snd(tmp_path, "s.npy"), "conversations": conv("<vec> <snd> what", "a")},
        {"conversations": conv("what", "")},
        good(tmp_path, "ok2"),
        {"id": "shares", "vec": "corrupt.npy", "conversations": conv("<vec> again", "b")},
    ]
    return write_json(tmp_path / "data.json", recs)


@pytest.mark.parametrize("workers", [1, 2])
def test_report_lists_every_bad_sample(mixed, workers):
    report = check_manifest(mixed, plugins=plugins(), workers=workers)
    assert not report.ok and report.total == 8 and report.num_good == 2
    bad = {b.id: b for b in report.bad}
    assert list(bad) == ["missing", "corrupt", "count", "shape", None, "shares"]
    root = mixed.parent.resolve()
    assert bad["missing"].file == str(root / "nope.npy") and "media file missing" in bad["missing"].reason
    assert bad["corrupt"].file == str(root / "corrupt.npy") and "not a .npy array" in bad["corrupt"].reason
    assert bad["shares"].file == bad["corrupt"].file
    assert "2 '<vec>' placeholder(s) in the human turns but 1 file(s)" in bad["count"].reason
    assert bad["shape"].file == str(root / "short.npy") and "expected shape (4,)" in bad["shape"].reason
    assert "missing 'id'" in bad[None].reason and "empty final answer" in bad[None].reason
    assert bad[None].index == 5


def test_run_check_data_prints_and_exits_1(mixed, fake_modalities):
    out = io.StringIO()
    assert run_check_data(mixed, workers=2, out=out) == 1
    lines = [ln for ln in out.getvalue().splitlines() if not ln.startswith("note:")]
    root = mixed.parent.resolve()
    assert lines[-1] == "8 samples, 6 bad"
    assert lines[0].startswith("missing: ") and str(root / "nope.npy") in lines[0]
    assert lines[1] == f"corrupt: {root / 'corrupt.npy'}: not a .npy array (ValueError)"
    assert lines[2].startswith("count: ")
    assert lines[3] == f"shape: {root / 'short.npy'}: expected shape (4,), got (3,)"
    assert lines[4].startswith("(no id, index 5): missing 'id'")
    assert lines[5].startswith("shares: ")
    assert len(lines) == 7


def test_all_good_exits_0(tmp_path, fake_modalities):
    path = write_json(tmp_path / "d.json", [good(tmp_path, "a"), good(tmp_path, "b")])
    out = io.StringIO()
    assert run_check_data(path, workers=2, out=out) == 0
    assert out.getvalue().splitlines()[-1] == "2 samples, 0 bad"


def test_root_option_and_unreadable_manifest(tmp_path, fake_modalities):
    data = tmp_path / "media"
    data.mkdir()
    path = write_json(tmp_path / "d.json", [good(data, "a")])
    assert run_check_data(path, root=data, workers=1, out=io.StringIO()) == 0
    assert run_check_data(path, workers=1, out=io.StringIO()) == 1
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    out = io.StringIO()
    assert run_check_data(broken, workers=1, out=out) == 1
    assert "error: " in out.getvalue() and "invalid JSON at line 1" in out.getvalue()
    with pytest.raises(DataError):
        check_manifest(broken, plugins=plugins())

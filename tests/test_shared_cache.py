"""The suite's shared-input cache (tests/_shared.py): built once per key, rebuilt after a killed
build, a new key for new inputs or new source, one build when several processes ask at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import _shared


def _counting_build(log: Path):
    def build(folder: Path) -> None:
        with log.open("a") as f:
            f.write("built\n")
        (folder / "value.txt").write_text("ok")
    return build


def test_an_entry_is_built_once_per_key_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MIL_TEST_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src.py"
    src.write_text("x = 1\n")
    monkeypatch.setattr(_shared, "ROOT", tmp_path)
    log = tmp_path / "log"
    a = _shared.entry("thing", {"n": 1}, [src], _counting_build(log))
    b = _shared.entry("thing", {"n": 1}, [src], _counting_build(log))
    assert a == b and (a / "value.txt").read_text() == "ok"
    assert log.read_text().count("built") == 1
    c = _shared.entry("thing", {"n": 2}, [src], _counting_build(log))
    src.write_text("x = 2\n")  # the code that builds it changed
    d = _shared.entry("thing", {"n": 1}, [src], _counting_build(log))
    assert len({a, c, d}) == 3 and log.read_text().count("built") == 3


def test_a_killed_build_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("MIL_TEST_CACHE", str(tmp_path / "cache"))

    def dies(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        raise KeyboardInterrupt

    try:
        _shared.entry("thing", {}, [], dies)
    except KeyboardInterrupt:
        pass
    folder = _shared.entry("thing", {}, [], _counting_build(tmp_path / "log"))
    assert sorted(p.name for p in folder.iterdir()) == [_shared.COMPLETE, "value.txt"]


def _ask(cache: str, log: str) -> str:
    import os
    import time

    os.environ["MIL_TEST_CACHE"] = cache

    def slow(folder: Path) -> None:
        time.sleep(0.5)
        _counting_build(Path(log))(folder)

    return str(_shared.entry("thing", {}, [], slow))


def test_processes_asking_at_once_share_one_build(tmp_path):
    log = tmp_path / "log"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        folders = pool.starmap(_ask, [(str(tmp_path / "cache"), str(log))] * 3)
    assert len(set(folders)) == 1 and log.read_text().count("built") == 1


def test_copy_of_is_writable_and_leaves_the_entry_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MIL_TEST_CACHE", str(tmp_path / "cache"))
    folder = _shared.entry("thing", {}, [], _counting_build(tmp_path / "log"))
    copy = _shared.copy_of(folder, tmp_path / "copy")
    (copy / "value.txt").write_text("changed")
    assert (folder / "value.txt").read_text() == "ok"
    assert not (copy / _shared.COMPLETE).exists()

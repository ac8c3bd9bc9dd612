"""A run refuses what it cannot do right: resume checks, the tokenizer from the checkpoint, run
folder locks and --overwrite, leftover temporaries, preflight and ``mil check-data RECIPE``.

One tiny two-stage run (a few seconds) is trained once per module and copied for each test; the
refusals happen before any model is built, so most tests take well under a second. Every refusal
is checked through the CLI entry point: exit code 2, one ``mil: error:`` line, no traceback, and
nothing the earlier run wrote is lost.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _tiny_run import tiny_args

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("MIL_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from mil_plugins.benchmark import make_benchmark

    root = tmp_path_factory.mktemp("bench") / "mcl-tiny"
    make_benchmark(root, size="tiny", seed=0)
    return root


@pytest.fixture(scope="module")
def finished(bench, tmp_path_factory):
    """A finished two-stage run (its folder is copied by each test)."""
    from mil_plugins.cli.train import main

    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(tiny_args(bench, out)) == 0
    return out


def train(args: list[str], capsys) -> tuple[int, str]:
    from mil_plugins.cli import run_friendly
    from mil_plugins.cli.train import main

    rc = run_friendly(main, args)
    err = capsys.readouterr().err
    return rc, err


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("mil: error:")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "feature-cache" not in p.parts and p.name != ".mil-run.lock"}


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ---- resume ---------------------------------------------------------------------------------------

RESUME_CHANGES = [
    (["methods=[{name: ewc}]"], "methods.0.name"),
    (["stages=" + json.dumps([
        {"name": "video", "modality": "video", "train": "video/train.json", "test": "video/test.json"},
        {"name": "image", "modality": "image", "train": "image/train.json", "test": "image/test.json"},
    ])], "stages.0.name"),
    (["stages=" + json.dumps([
        {"name": "image", "modality": "image", "train": "image/train.json", "test": "image/test.json"},
    ]), "modalities={image: {}}"], "stages (number of entries)"),
    (["modalities.image.resample=bilinear"], "modalities.image.resample"),
    (["train.seed=1"], "train.seed"),
    (["train.lr=0.01"], "train.lr"),
    (["train.batch_size=8"], "train.batch_size"),
    (["data.max_train_samples=6"], "data.max_train_samples"),
]


@pytest.mark.parametrize("extra, key", RESUME_CHANGES, ids=[c[1] for c in RESUME_CHANGES])
def test_resume_refuses_a_changed_recipe(bench, run_copy, capsys, extra, key, tmp_path):
    before = snapshot(run_copy)
    rc, err = train([*tiny_args(bench, run_copy, *extra), "--resume"], capsys)
    line = error_line(err)
    assert rc == 2 and key in line and "change(s) since the checkpoint" in line, line
    assert snapshot(run_copy) == before


def test_resume_refuses_changed_data(bench, run_copy, capsys, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(bench, data)
    manifest = data / "video" / "test.json"
    samples = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(samples[:-1]))
    rc, err = train([*tiny_args(data, run_copy, "--allow-change", "data.root"), "--resume"], capsys)
    line = error_line(err)
    assert rc == 2 and "manifest video/test.json: contents changed" in line, line


def test_resume_allows_safe_changes_by_name_only(bench, run_copy, capsys):
    args = tiny_args(bench, run_copy, "train.log_every_steps=3")
    rc, err = train([*args, "--resume"], capsys)
    assert rc == 2 and "--allow-change: train.log_every_steps" in error_line(err)
    rc, err = train([*args, "--resume", "--allow-change", "train.lr"], capsys)
    assert rc == 2 and "cannot change it" in error_line(err)
    rc, err = train([*args, "--resume", "--allow-change", "train.log_every_steps"], capsys)
    assert rc == 0, err


def test_resume_loads_the_tokenizer_of_the_checkpoint(bench, run_copy, monkeypatch):
    """Rebuilding the word tokenizer from the data moved word ids; resume must load it instead."""
    from transformers import AutoTokenizer

    import mil_plugins.data as data_pkg
    from mil_plugins.engine.run import Runner
    from mil_plugins.recipe import load_recipe

    last = run_copy / "checkpoints" / "stage-01-image"
    shutil.rmtree(run_copy / "checkpoints" / "last")
    shutil.copytree(last, run_copy / "checkpoints" / "last")

    def no_rebuild(*a, **k):
        raise AssertionError("the tokenizer was rebuilt from the data on resume")

    monkeypatch.setattr(data_pkg, "build_word_tokenizer", no_rebuild)
    args = tiny_args(bench, run_copy)
    runner = Runner(load_recipe(args[0], args[1:]), resume=True)
    try:
        saved = AutoTokenizer.from_pretrained(str(last / "tokenizer")).get_vocab()
        assert runner.session.tokenizer.get_vocab() == saved
        assert runner.state["completed"] == 1
    finally:
        runner.folder.release()


def test_resume_after_stage_one_finishes_like_the_uninterrupted_run(bench, finished, run_copy,
                                                                    capsys):
    ckpts = run_copy / "checkpoints"
    shutil.rmtree(ckpts / "last")
    shutil.rmtree(ckpts / "stage-02-video")
    shutil.copytree(ckpts / "stage-01-image", ckpts / "last")
    rc, err = train([*tiny_args(bench, run_copy), "--resume"], capsys)
    assert rc == 0, err
    a = json.loads((finished / "metrics.json").read_text())
    b = json.loads((run_copy / "metrics.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["stages"] == b["stages"]


def test_resume_names_a_corrupt_checkpoint_file(bench, run_copy, capsys):
    weights = run_copy / "checkpoints" / "last" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rc, err = train([*tiny_args(bench, run_copy), "--resume"], capsys)
    line = error_line(err)
    assert rc == 2 and "weights.safetensors" in line


# ---- the run folder -------------------------------------------------------------------------------

def test_fresh_run_into_a_finished_run_is_refused(bench, run_copy, capsys):
    before = snapshot(run_copy)
    rc, err = train(tiny_args(bench, run_copy), capsys)
    line = error_line(err)
    assert rc == 2 and "holds another run's results" in line and "--overwrite" in line
    assert snapshot(run_copy) == before


def test_overwrite_leaves_no_checkpoint_of_the_old_run(bench, run_copy, capsys):
    # the old run had two stages; the new one has one: no stage-02 may be left beside it
    one = json.dumps([{"name": "image", "modality": "image", "train": "image/train.json",
                       "test": "image/test.json"}])
    rc, err = train([*tiny_args(bench, run_copy, f"stages={one}", "modalities={image: {}}"),
                     "--overwrite"], capsys)
    assert rc == 0, err
    names = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    assert names == ["last", "stage-01-image", "warmup"]
    assert json.loads((run_copy / "metrics.json").read_text())["stages"] == ["image"]


def test_a_live_run_holds_its_folder(tmp_path):
    from mil_plugins.engine.rundir import RunFolder, RunFolderError

    first = RunFolder(tmp_path / "out")
    first.acquire()
    try:
        with pytest.raises(RunFolderError) as err:
            RunFolder(tmp_path / "out").acquire()
        assert "in use by another run" in str(err.value) and "pid" in str(err.value)
    finally:
        first.release()
    RunFolder(tmp_path / "out").acquire()  # released: free again


def test_claim_releases_the_folder_when_setup_fails_and_keeps_it_otherwise(tmp_path):
    from mil_plugins.engine.rundir import RunFolder, RunFolderError

    folder = RunFolder(tmp_path / "out")
    with pytest.raises(KeyError):
        with folder.claim():
            raise KeyError("setup failed")
    again = RunFolder(tmp_path / "out")
    again.acquire()  # released by the failure: free again
    again.release()
    held = RunFolder(tmp_path / "other")
    with held.claim():
        pass
    with pytest.raises(RunFolderError):
        RunFolder(tmp_path / "other").acquire()  # still held after a successful setup
    held.release()
    idle = RunFolder(tmp_path / "rank1")
    with idle.claim(main=False):  # another rank: nothing acquired
        pass
    free = RunFolder(tmp_path / "rank1")
    free.acquire()
    free.release()


def test_a_live_run_in_another_process_holds_its_folder(bench, tmp_path, capsys):
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mil_plugins.engine.rundir import RunFolder
        RunFolder({str(out)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = train(tiny_args(bench, out), capsys)
        line = error_line(err)
        assert rc == 2 and f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock file is stale, not held, and the next run takes it over
    from mil_plugins.engine.rundir import RunFolder

    folder = RunFolder(out)
    folder.acquire()
    folder.release()


def test_leftover_temporaries_are_removed_at_start(bench, run_copy, capsys):
    ckpts = run_copy / "checkpoints"
    (ckpts / ".last.tmp-abc123").mkdir()
    (ckpts / ".last.tmp-abc123" / "weights.safetensors").write_bytes(b"half")
    (run_copy / ".metrics.json.tmp-xyz").write_text("{")
    rc, err = train([*tiny_args(bench, run_copy), "--resume"], capsys)
    assert rc == 0, err
    assert not list(run_copy.rglob("*.tmp-*"))


def test_resume_and_overwrite_together_are_refused(bench, run_copy, capsys):
    rc, err = train([*tiny_args(bench, run_copy), "--resume", "--overwrite"], capsys)
    assert rc == 2 and "give one of them" in error_line(err)


# ---- preflight and check-data RECIPE -----------------------------------------------------------

def _broken_last_stage(bench: Path, tmp_path: Path, how: str) -> Path:
    data = tmp_path / "data"
    shutil.copytree(bench, data)
    manifest = data / "video" / "test.json"
    samples = json.loads(manifest.read_text())
    if how == "media":
        (data / samples[-1]["video"]).write_bytes(b"not a video at all")
    elif how == "metric":
        samples[-1]["metric"] = "accuracy"
    elif how == "manifest":
        manifest.write_text("[{")
        return data
    manifest.write_text(json.dumps(samples))
    return data


@pytest.mark.parametrize("how, words", [("media", "not a video at all"),
                                        ("metric", "unknown metric 'accuracy'"),
                                        ("manifest", "invalid JSON")])
def test_preflight_stops_before_the_first_stage(bench, tmp_path, capsys, how, words):
    data = _broken_last_stage(bench, tmp_path, how)
    out = tmp_path / "out"
    rc, err = train(tiny_args(data, out, "data.max_test_samples=100"), capsys)
    line = error_line(err)
    assert rc == 2 and "preflight" in line and "video/test.json" in line
    assert not (out / "checkpoints").exists()  # nothing trained


def test_check_data_recipe_uses_the_recipe_root_and_options(bench, tmp_path, capsys):
    from mil_plugins import cli

    data = _broken_last_stage(bench, tmp_path, "media")
    args = tiny_args(data, tmp_path / "out")
    assert cli.main(["check-data", *args, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "video/test.json" in out and "1 bad sample(s)" in out
    # the recipe's modality options reach the check (a voxel larger than the cloud)
    point = [{"name": "point", "modality": "point", "train": "point/train.json"}]
    common = ["check-data", str(args[0]), f"data.root={bench}", f"stages={json.dumps(point)}",
              "warmup=null"]
    assert cli.main([*common, "modalities={point: {use_colors: true}}", "--workers", "1"]) == 0
    capsys.readouterr()
    assert cli.main([*common, "modalities={point: {use_colors: true, voxel_size: 1000}}",
                     "--workers", "1"]) == 1
    assert "voxel" in capsys.readouterr().out

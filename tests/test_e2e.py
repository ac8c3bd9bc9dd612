"""End to end: the real recipes, through the real launchers, at tiny scale.

* the quickstart (all five modality stages) through plain ``python tools/train.py``
* the same recipe through the ``deepspeed`` launcher, 2 processes on CPU (gloo, ZeRO-2), whose
  metrics must match a single-process run
* a run killed mid-stage and resumed, which must end exactly like an uninterrupted run
* ``mil eval`` and ``mil export`` on the checkpoints a run wrote
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _shared import benchmark, torch_extensions

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
TRAIN = [sys.executable, str(ROOT / "tools" / "train.py")]
TWO_STAGES = ("stages=[{name: image, modality: image, train: image/train.json, test: image/test.json},"
              " {name: audio, modality: audio, train: audio/train.json, test: audio/test.json}]")

pytestmark = pytest.mark.slow


def env(cmd: list | None = None):
    e = dict(os.environ)
    e.setdefault("MIL_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    if cmd and Path(str(cmd[0])).name == "deepspeed":
        # DeepSpeed JIT-builds its CPU shared-memory allreduce op: built once, for every launch
        # of the run (tests/_shared.py)
        e["TORCH_EXTENSIONS_DIR"] = torch_extensions()
    return e


@pytest.fixture(scope="module")
def bench():
    return benchmark("tiny", seed=0)  # shared and read-only: a test that writes works on a copy


def common(bench, out, *extra, pretrain: tuple = ("encoder_pretraining=null",)):
    return [f"data.root={bench}", "data.generate.size=tiny", f"output.dir={out}",
            "output.tensorboard=false", *pretrain, *extra]


def run(cmd, timeout=600, **kw):
    proc = subprocess.run(cmd, cwd=ROOT, env=env(cmd), capture_output=True, text=True,
                          timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_quickstart_all_stages_plain_python(bench, tmp_path):
    out, pre = tmp_path / "qs", tmp_path / "pre"
    pretrain = (f"encoder_pretraining.data.root={pre}", "encoder_pretraining.data.generate.size=tiny",
                "encoder_pretraining.steps=3", "encoder_pretraining.steps_by_modality={}")
    run([*TRAIN, str(QUICKSTART), *common(bench, out, "warmup.epochs=1", "train.epochs=1",
                                          pretrain=pretrain)])
    m = metrics(out)
    # every encoder was pretrained once (recipe's encoder_pretraining, 2 workers) and loaded
    saved = json.loads((out / "checkpoints" / "stage-05-point" / "recipe.json").read_text())
    weights = sorted((pre / "encoders").glob("*.safetensors"))
    assert [w.name.split("-")[0] for w in weights] == ["audio", "depth", "image", "point", "video"]
    assert all(saved["modalities"][w.name.split("-")[0]]["encoder_weights"] == str(w)
               for w in weights)
    assert m["stages"] == ["image", "video", "audio", "depth", "point"]
    R = m["accuracy_matrix"]
    assert len(R) == 5 and all(len(row) == 5 for row in R)
    for i in range(5):
        for j in range(5):
            assert (R[i][j] is None) == (j > i)
            if j <= i:
                assert 0.0 <= R[i][j] <= 100.0
    for key in ("final_average_accuracy", "average_incremental_accuracy", "forgetting",
                "backward_transfer", "MFT", "MFN", "MAA"):
        assert isinstance(m[key], float), key
    assert len(m["trainable_parameters"]) == 5 and all(n > 0 for n in m["trainable_parameters"])
    assert len(m["seconds"]) == 5
    # where it ran: this machine, with the one thread the run was given (MIL_NUM_THREADS)
    from mil_plugins.machine import describe

    here = describe()
    assert m["machine"]["torch_threads"] == 1
    assert {k: m["machine"][k] for k in ("cpu", "cpu_flags", "torch_cpu_capability")} == \
        {k: here[k] for k in ("cpu", "cpu_flags", "torch_cpu_capability")}
    for name in ("report.md", "accuracy_matrix.png", "accuracy_curves.png", "logs/train.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for i, stage in enumerate(m["stages"]):
        assert (out / "checkpoints" / f"stage-{i + 1:02d}-{stage}" / "weights.safetensors").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd() -> list[str]:
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
            str(ROOT / "tools" / "train.py"), str(QUICKSTART)]


def shm_buffers_left(cmd: list[str]) -> list[str]:
    """DeepSpeed's CPU allreduce buffers in /dev/shm of the launch ``cmd`` (by its port)."""
    port = cmd[cmd.index("--master_port") + 1]
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def kill_mid_stage(cmd: list[str], out: Path, stage: str, signum=signal.SIGKILL) -> None:
    """Start ``cmd`` and kill it once its rolling checkpoint is mid-way through ``stage``."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(cmd), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if state.exists():
                s = json.loads(state.read_text())
                if s["in_stage"] == stage and s["step"] >= 2:
                    break
            if proc.poll() is not None:
                pytest.fail("the run finished before it could be killed mid-stage")
            time.sleep(0.05)
        os.killpg(proc.pid, signum)  # the launcher and every rank it started
    finally:
        proc.wait()
    assert not (out / "metrics.json").exists() or metrics(out)["completed_stages"] < 2


def step_losses(out: Path, stage: str | None = None) -> list[tuple[tuple[str, int], float]]:
    rows = map(json.loads, (out / "logs" / "train.jsonl").read_text().splitlines())
    return [((r["stage"], r["step"]), r["loss"]) for r in rows
            if "loss" in r and (stage is None or r["stage"] == stage)]


@pytest.mark.extended
def test_deepspeed_two_ranks_train_the_same_model_as_one_process(bench, tmp_path):
    """1 process and 2 ranks see the same global batches, so (the loss being the global batch's
    token mean, not a mean of per-rank means) every step's loss agrees to 1e-4 for 56 steps, and
    so do the scores. (Extended tier: the long regime of the default tier's
    ``test_deepspeed_two_processes_match_single_process_and_resume``, which checks the same at
    every one of its 22 steps.)"""
    pytest.importorskip("deepspeed")
    overrides = ["stages=[{name: audio, modality: audio, train: audio/train.json, test: audio/test.json}]",
                 "warmup.max_steps=4", "train.max_steps=56", "train.batch_size=8",
                 "train.log_every_steps=1"]
    single, multi = tmp_path / "single", tmp_path / "ds"
    run([*TRAIN, str(QUICKSTART), *common(bench, single, *overrides)])
    run([*deepspeed_cmd(), *common(bench, multi, *overrides,
                                   "train.deepspeed=recipes/deepspeed/zero2.json")], timeout=600)
    loss_a, loss_b = step_losses(single, "audio"), step_losses(multi, "audio")
    assert len(loss_a) == 56 and [k for k, _ in loss_a] == [k for k, _ in loss_b]
    diffs = [abs(x - y) for (_, x), (_, y) in zip(loss_a, loss_b)]
    assert max(diffs) <= 1e-4, diffs
    a, b = metrics(single), metrics(multi)
    assert b["world_size"] == 2
    assert abs(a["accuracy_matrix"][0][0] - b["accuracy_matrix"][0][0]) <= 1.0
    for task, score in a["per_task"]["audio"].items():
        assert abs(score - b["per_task"]["audio"][task]) <= 3.0, (a["per_task"], b["per_task"])


def test_deepspeed_two_processes_match_single_process_and_resume(bench, tmp_path):
    """1 process and 2 ranks (ZeRO-2) see the same global batches, so (the loss being the global
    batch's token mean, not a mean of per-rank means) every logged step's loss agrees to 1e-4,
    and so do the scores; killed mid-stage under the launcher and resumed under it, the run ends
    the same; DeepSpeed's allreduce buffers are gone from /dev/shm either way."""
    pytest.importorskip("deepspeed")
    overrides = [TWO_STAGES, "warmup.max_steps=6", "train.max_steps=8", "train.batch_size=8",
                 "train.save_every_steps=2", "train.log_every_steps=1"]
    ds = ["train.deepspeed=recipes/deepspeed/zero2.json"]
    single, multi, killed = tmp_path / "single", tmp_path / "ds", tmp_path / "ds-killed"
    run([*TRAIN, str(QUICKSTART), *common(bench, single, *overrides)])
    launch = deepspeed_cmd()
    run([*launch, *common(bench, multi, *overrides, *ds)], timeout=600)
    assert shm_buffers_left(launch) == []  # DeepSpeed itself leaves 69 MB a rank there
    a, b = metrics(single), metrics(multi)
    assert b["world_size"] == 2 and a["world_size"] == 1
    for ra, rb in zip(a["accuracy_matrix"], b["accuracy_matrix"]):
        for x, y in zip(ra, rb):
            assert (x is None) == (y is None)
            if x is not None:
                assert abs(x - y) <= 1.0, (a["accuracy_matrix"], b["accuracy_matrix"])
    loss_a, loss_b = step_losses(single), step_losses(multi)
    assert len(step_losses(single, "audio")) == 8
    assert [k for k, _ in loss_a] == [k for k, _ in loss_b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(loss_a, loss_b)) <= 1e-4
    for stage, tasks in a["per_task"].items():
        for task, score in tasks.items():
            assert abs(score - b["per_task"][stage][task]) <= 3.0, (a["per_task"], b["per_task"])

    # killed mid-stage under the launcher, resumed under the launcher: the same result
    launch = deepspeed_cmd()
    kill_mid_stage([*launch, *common(bench, killed, *overrides, *ds)], killed, "audio")
    assert shm_buffers_left(launch) == []  # unlinked as soon as every rank had mapped them
    assert json.loads((killed / "checkpoints" / "last" / "state.json").read_text())["deepspeed_tag"]
    run([*deepspeed_cmd(), *common(bench, killed, *overrides, *ds), "--resume"], timeout=600)
    assert metrics(killed)["accuracy_matrix"] == b["accuracy_matrix"]
    assert not (killed / "checkpoints" / "deepspeed").exists()


@pytest.mark.extended
def test_killed_run_resumes_to_the_same_result(bench, tmp_path):
    """SIGKILLed mid-stage as a plain process, resumed: the same end. (Extended tier: the default
    tier checks a plain ``tools/train.py`` process that dies (exit 137) mid-stage and resumes to
    bit-identical weights in ``bench/gpu_check.py``'s CPU dry run (``resume_mid_stage``), and a
    SIGKILL from outside at any moment, resumed to the same scores, under the launcher in
    ``test_deepspeed_two_processes_match_single_process_and_resume``.)"""
    overrides = [TWO_STAGES, "warmup.max_steps=4", "train.max_steps=8", "train.batch_size=8",
                 "train.save_every_steps=2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run([*TRAIN, str(QUICKSTART), *common(bench, full, *overrides)])

    kill_mid_stage([*TRAIN, str(QUICKSTART), *common(bench, killed, *overrides)], killed, "audio")
    run([*TRAIN, str(QUICKSTART), *common(bench, killed, *overrides), "--resume"])
    a, b = metrics(full), metrics(killed)
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    wa = (full / "checkpoints" / "stage-02-audio" / "weights.safetensors")
    wb = (killed / "checkpoints" / "stage-02-audio" / "weights.safetensors")
    from safetensors.torch import load_file
    ta, tb = load_file(str(wa)), load_file(str(wb))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-6), k


def test_eval_and_export_from_a_checkpoint(bench, tmp_path):
    out = tmp_path / "run"
    run([*TRAIN, str(QUICKSTART), *common(bench, out, TWO_STAGES, "warmup.max_steps=2",
                                          "train.max_steps=2", "eval.unseen=true",
                                          "eval.baseline=true")])
    m = metrics(out)
    assert m["accuracy_matrix"][0][1] is not None  # unseen stage scored (forward transfer)
    assert len(m["baseline"]) == 2 and isinstance(m["forward_transfer"], float)
    ckpt = out / "checkpoints" / "stage-02-audio"
    scores = tmp_path / "scores.json"
    mil = [sys.executable, "-m", "mil_plugins.cli"]
    run([*mil, "eval", str(ckpt), str(bench / "image" / "test.json"), "--root", str(bench),
         "--out", str(scores)])
    result = json.loads(scores.read_text())
    ours = next(iter(result.values()))["score"]
    assert ours == pytest.approx(metrics(out)["accuracy_matrix"][1][0], abs=1e-6)

    export = tmp_path / "llava"
    run([*mil, "export", str(ckpt), "--to", "llava", str(export)])
    for modality in ("image", "audio"):
        raw = torch.load(export / modality / "mm_projector.bin", weights_only=True)
        assert "model.mm_projector.0.weight" in raw and "model.mm_projector.2.bias" in raw
        cfg = json.loads((export / modality / "config.json").read_text())
        assert cfg["mm_projector_type"] == "mlp2x_gelu"
        assert raw["model.mm_projector.0.weight"].shape[1] == cfg["mm_hidden_size"]


def test_closed_set_answers_in_a_run_and_from_its_checkpoint(bench, tmp_path):
    """``eval.choices=task``: the run's scores are the ones ``mil eval --choices task`` gives its
    checkpoint; training is untouched; the caption task is generated either way, so it scores
    as in a generating run; every question is answered with one of its task's answers."""
    overrides = ["stages=[{name: audio, modality: audio, train: audio/train.json, test: audio/test.json}]",
                 "warmup.max_steps=4", "train.max_steps=24", "train.batch_size=8"]
    gen, closed = tmp_path / "gen", tmp_path / "closed"
    run([*TRAIN, str(QUICKSTART), *common(bench, gen, *overrides)])
    run([*TRAIN, str(QUICKSTART), *common(bench, closed, *overrides, "eval.choices=task")])
    assert step_losses(gen) == step_losses(closed)
    a, b = metrics(gen)["per_task"]["audio"], metrics(closed)["per_task"]["audio"]
    assert set(a) == set(b) == {"pitch", "count", "caption"}
    assert b["caption"] == pytest.approx(a["caption"], abs=1e-9)
    mil = [sys.executable, "-m", "mil_plugins.cli"]
    ckpt, test = closed / "checkpoints" / "stage-01-audio", bench / "audio" / "test.json"
    # the built-in questions list their options: the same answer sets as the task's
    for choices, expect in (("recipe", b), ("task", b), ("sample", b), ("generate", a)):
        scores = tmp_path / f"{choices}.json"
        run([*mil, "eval", str(ckpt), str(test), "--root", str(bench), "--choices", choices,
             "--out", str(scores)])
        tasks = next(iter(json.loads(scores.read_text()).values()))["tasks"]
        assert tasks == pytest.approx(expect, abs=1e-9), choices

    # every closed-set prediction is one of its task's answers
    from mil_plugins.choices import task_answer_sets
    from mil_plugins.engine.loading import load_for_eval
    from mil_plugins.evaluate import predict

    session = load_for_eval(ckpt)
    samples = session.load_samples(test, bench)
    rows = predict(session.model, samples, session.make_loader, methods=session.methods,
                   ctx=session.ctx, batch_size=16, options=session.answer_options(samples, "task"))
    sets = task_answer_sets(samples)
    assert sets.keys() == {"pitch", "count"}
    for row in rows:
        if row["task"] in sets:
            assert row["prediction"] in sets[row["task"]], row


def test_bad_samples_raise_or_are_skipped_and_counted(bench, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(bench / "image", data / "image")
    shutil.copy(bench / "benchmark.json", data / "benchmark.json")
    manifest = data / "image" / "train.json"
    rows = json.loads(manifest.read_text())
    rows.append({"id": "broken-1", "image": "image/files/missing.png", "task": "shape",
                 "metric": "exact_match", "conversations": [
                     {"from": "human", "value": "<image>\nWhat shape is shown?"},
                     {"from": "gpt", "value": "circle"}]})
    manifest.write_text(json.dumps(rows))
    args = [*TRAIN, str(QUICKSTART), f"data.root={data}", "data.generate=null",
            "output.tensorboard=false", "encoder_pretraining=null", "warmup=null", "train.max_steps=1",
            "stages=[{name: image, modality: image, train: image/train.json, test: image/test.json}]"]
    failed = subprocess.run([*args, f"output.dir={tmp_path / 'raise'}"], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert "train.json" in failed.stderr and "broken-1" in failed.stderr and "missing.png" in failed.stderr
    run([*args, f"output.dir={tmp_path / 'skip'}", "data.on_error=skip"])
    m = metrics(tmp_path / "skip")
    assert [s["id"] for s in m["skipped_samples"]] == ["broken-1"]
    assert "broken-1" in (tmp_path / "skip" / "report.md").read_text()

"""A built wheel works outside the checkout: installed into a fresh venv, `mil train` runs a tiny
recipe through the deepspeed launcher (2 CPU ranks), with the ZeRO config found inside the package.

Offline and quick: the wheel is built without build isolation and installed with --no-deps; the
fresh venv reaches the dependencies through a .pth line naming this interpreter's site-packages
(that folder's own .pth files, such as an editable install of this checkout, are not run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from _shared import torch_extensions

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def clean_env(**extra) -> dict:
    """The environment without PYTHONPATH (which could point back into the checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def sh(cmd, cwd, timeout=600, env=None):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env())
    assert proc.returncode == 0, f"{cmd}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(python: Path, command: list, cwd: Path, env: dict, timeout: int = 300) -> None:
    """``command`` on 2 CPU ranks through the deepspeed launcher. Once in the full suite, a launch
    ran past 600 s before either rank reached its output folder: DeepSpeed JIT-built its CPU
    shared-memory allreduce op into this test's own extension folder, and that build crawled on a
    machine whose /dev/shm held 19 GB of allreduce buffers earlier DeepSpeed runs had left behind
    (the same launch takes under a minute on a clean machine). The op now comes prebuilt, once per
    run (``_shared.torch_extensions``). A launch that runs past ``timeout`` is killed with every
    rank it started, its output is printed, and it is tried once more on a fresh port and a fresh
    extension folder (which builds the op anew, in case the shared build was what hung). A second
    overrun, or any failure, fails the test."""
    tails = []
    for attempt in range(2):
        proc = subprocess.Popen([str(c) for c in [python, "-m", "deepspeed.launcher.runner",
                                                  "--num_gpus", "2", "--master_port", free_port(),
                                                  *command]],
                                cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
            out, _ = proc.communicate()
            tails.append(out[-3000:])
            print(f"[test_wheel] launch {attempt + 1} hung for {timeout} s; its output:\n{tails[-1]}")
            env = {**env, "TORCH_EXTENSIONS_DIR": tempfile.mkdtemp(prefix="mil-torch-ext-")}
            continue
        assert proc.returncode == 0, f"{command}\n{out[-6000:]}"
        return
    pytest.fail("the 2-rank launch hung twice:\n" + "\n---\n".join(tails))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, wheel path): the wheel of a clean copy of the checkout, in a fresh venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    top = {".git", ".venv", "runs", "data", "build", "dist", ".pytest_cache"}  # at the top only
    shutil.copytree(ROOT, src, symlinks=True, ignore=lambda d, names: [
        n for n in names if (Path(d) == ROOT and n in top) or n == "__pycache__"
        or n.endswith(".egg-info")])
    sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", tmp / "dist", src], cwd=tmp)
    wheel = next((tmp / "dist").glob("mil_plugins-*.whl"))
    venv = tmp / "venv"
    sh([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    purelib = Path(sh([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      cwd=tmp).strip())
    (purelib / "_deps_from_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
       cwd=tmp)
    return python, wheel


def test_the_wheel_holds_the_packages_and_the_deepspeed_configs(installed):
    import zipfile

    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("zero0", "zero2", "zero2_offload", "zero3", "zero3_offload"):
        assert f"mil_plugins/recipe/deepspeed/{config}.json" in names
    assert "encoders/image.py" in names and "mil_plugins/cli/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mil = mil_plugins.cli:main" in text and "[mil_plugins.modalities]" in text


def test_mil_train_from_the_wheel_through_the_deepspeed_launcher(installed, tmp_path):
    pytest.importorskip("deepspeed")
    python, _ = installed
    venv_bin = python.parent
    work = tmp_path / "elsewhere"  # not the checkout: nothing may come from it
    work.mkdir()
    where = sh([python, "-c", "import mil_plugins, encoders; print(mil_plugins.__file__); "
                              "print(encoders.__file__)"], cwd=work)
    assert all(str(venv_bin.parent) in line for line in where.split()), where
    sh([venv_bin / "mil", "make-benchmark", work / "bench", "--size", "tiny"], cwd=work)
    recipe = work / "quickstart.yaml"
    shutil.copy(ROOT / "recipes" / "quickstart.yaml", recipe)
    env = clean_env(MIL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                    TORCH_EXTENSIONS_DIR=torch_extensions())
    train = [venv_bin / "mil", "train", recipe, f"data.root={work / 'bench'}", "data.generate=null",
             "encoder_pretraining=null", f"output.dir={work / 'run'}", "output.tensorboard=false",
             "warmup=null",
             "stages=[{name: image, modality: image, train: image/train.json, test: image/test.json}]",
             "train.max_steps=2", "train.batch_size=4", "data.max_train_samples=8",
             "data.max_test_samples=4", "data.preflight=manifests", "--overwrite"]
    launch_two_ranks(python, train, work, env)
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["completed_stages"] == 1
    assert (work / "run" / "checkpoints" / "stage-01-image" / "weights.safetensors").is_file()

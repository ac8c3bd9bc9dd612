#!/usr/bin/env python
"""The GPU path of issue #18, checked in one prepared run, then the throughput bench.

    bash bench/gpu_check.sh                       # on a GPU machine (sets up, then runs this)
    python bench/gpu_check.py --out DIR           # the checks + bench/gpu_step.py --shape llava7b
    python bench/gpu_check.py --cpu-dry-run       # the same checks on CPU, tiny shapes (no GPU claims)

Checks, each a short real run of ``tools/train.py`` (a two-stage cut of recipes/quickstart.yaml:
image then depth, a 2-step text warm-up, a few steps per stage, tiny model) in its own process:

* ``env``               torch sees a CUDA device (dry run: CPU); versions recorded
* ``bf16_autocast``     one process, ``train.precision=bf16`` (autocast on the device)
* ``zero2``             the ``deepspeed`` launcher, 1 process (NCCL on a GPU, gloo on CPU), ZeRO-2, bf16
* ``zero3``             the same with ZeRO-3
* ``zero3_lwf_ewc``     ZeRO-3 with ``methods: [lwf, ewc]`` (a teacher copy and Fisher penalties of
                        partitioned parameters)
* ``resume_mid_stage``  a run that dies right after its rolling checkpoint at step 4 of stage 2,
                        resumed, against the same run uninterrupted: the final weights must match
                        (exactly on CPU; allclose on a GPU, whose kernels need not be deterministic)
* ``gpu_step``          ``bench/gpu_step.py --shape llava7b`` (dry run: ``--shape tiny``)

A check passes when the run exits 0, completes both stages with finite losses, and its own
condition holds. Results go to ``OUT/gpu_check.json`` (one record per check, rewritten after each
one, so a run cut short keeps what it did), ``OUT/gpu_check.log`` (every command and the tail of its
output) and ``OUT/gpu_step.json``. ``OUT`` defaults to ``$OUT`` (the device tool's folder), else
``bench/results/<date>-<gpu name | cpu-dry-run>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "quickstart.yaml"
CARRIED_DATA = ROOT / "bench" / ".gpu-carry" / "data"
CHECKS = ("env", "bf16_autocast", "zero2", "zero3", "zero3_lwf_ewc", "resume_mid_stage",
          "gpu_step")
STAGES = ("image", "depth")  # both read with Pillow alone (no PyAV / librosa / open3d needed)


# ---- runs -----------------------------------------------------------------------------------------

def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A two-stage cut of the quickstart recipe that trains a few steps on ``data`` (already
    generated: the generator imports PyAV / soundfile, which a bare GPU image may lack)."""
    recipe = yaml.safe_load(RECIPE.read_text())
    stages = [s for s in recipe["stages"] if s["name"] in STAGES]
    modalities = {s["modality"]: recipe["modalities"].get(s["modality"]) or {} for s in stages}
    for options in modalities.values():  # transformers' tiny CLIP: the GPU image may lack timm
        options.setdefault("tiny_tower", "clip")
    return [str(RECIPE), f"data.root={data}", f"output.dir={out}", "data.generate=null",
            "encoder_pretraining=null",  # random towers: these checks are not about pretraining
            "output.tensorboard=false", f"modalities={json.dumps(modalities)}",
            f"stages={json.dumps(stages)}", "warmup.max_steps=2", "train.max_steps=3",
            "train.batch_size=8", "data.max_train_samples=16", "data.max_test_samples=4",
            "eval.batch_size=8", "eval.unseen=false", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> list[str]:
    exe = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if exe:
        return [exe]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


class Checker:
    def __init__(self, out: Path, data: Path, dry_run: bool, timeout: int, work: Path):
        self.out, self.data, self.dry_run, self.timeout, self.work = out, data, dry_run, timeout, work
        self.records: list[dict] = []
        self.log = out / "gpu_check.log"
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT)] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.env.setdefault("MIL_NUM_THREADS", "1" if dry_run else "4")
        if not dry_run:
            self.env.setdefault("NCCL_DEBUG", "INFO")
        if dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run claims nothing about a GPU
            # DeepSpeed JIT-builds its CPU allreduce op; a private folder avoids stale locks
            self.env.setdefault("TORCH_EXTENSIONS_DIR", str(work / "torch-extensions"))

    # -- helpers
    def sh(self, cmd: list[str], timeout: int | None = None) -> tuple[int, str]:
        started = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True,
                                  timeout=timeout or self.timeout)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = 124
            text = f"{exc.stdout or ''}{exc.stderr or ''}\n[gpu_check] timed out after {exc.timeout}s"
            text = text if isinstance(text, str) else text.decode(errors="replace")
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(f"\n$ {' '.join(cmd)}\n[rc {rc}, {time.time() - started:.1f}s]\n{text[-6000:]}\n")
        return rc, text

    def train(self, name: str, *extra: str, deepspeed: str | None = None,
              script: list[str] | None = None) -> tuple[int, str, Path]:
        out = self.work / name
        args = tiny_args(self.data, out, *extra)
        if deepspeed:
            cmd = [*deepspeed_launcher(), "--num_gpus", "1", "--master_port", str(free_port()),
                   str(ROOT / "tools" / "train.py"), *args,
                   f"train.deepspeed=recipes/deepspeed/{deepspeed}.json"]
        else:
            cmd = [sys.executable, *(script or [str(ROOT / "tools" / "train.py")]), *args]
        rc, text = self.sh(cmd)
        return rc, text, out

    @staticmethod
    def finished(rc: int, out: Path) -> dict:
        """Exit status, completed stages and finite step losses of a run folder."""
        detail: dict = {"rc": rc}
        metrics = out / "metrics.json"
        if metrics.exists():
            m = json.loads(metrics.read_text())
            detail["completed_stages"] = m.get("completed_stages")
            detail["accuracy_matrix"] = m.get("accuracy_matrix")
        log = out / "logs" / "train.jsonl"
        losses = []
        if log.exists():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            losses = [r["loss"] for r in rows if "loss" in r]
        detail["logged_losses"] = len(losses)
        detail["losses_finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
        detail["ok"] = (rc == 0 and detail.get("completed_stages") == len(STAGES)
                        and detail["losses_finite"])
        return detail

    def record(self, name: str, passed: bool, started: float, **detail) -> None:
        self.records.append({"check": name, "passed": bool(passed),
                             "seconds": round(time.time() - started, 1), **detail})
        print(f"[gpu_check] {name}: {'PASS' if passed else 'FAIL'} ({self.records[-1]['seconds']}s)",
              flush=True)
        self.write()

    def write(self) -> None:
        from mil_plugins.atomic import atomic_write_text

        doc = {"mode": "cpu-dry-run" if self.dry_run else "gpu", "checks": self.records,
               "passed": all(r["passed"] for r in self.records)}
        atomic_write_text(self.out / "gpu_check.json", json.dumps(doc, indent=2) + "\n")

    # -- the checks
    def env_check(self) -> None:
        started = time.time()
        code = ("import json, torch, transformers, peft\n"
                "try:\n import deepspeed; ds = deepspeed.__version__\nexcept Exception as e:\n"
                " ds = f'missing ({type(e).__name__}: {e})'\n"
                "cuda = torch.cuda.is_available()\n"
                "print(json.dumps({'torch': torch.__version__, 'cuda': cuda,"
                " 'gpu': torch.cuda.get_device_name(0) if cuda else None,"
                " 'cuda_version': torch.version.cuda, 'transformers': transformers.__version__,"
                " 'peft': peft.__version__, 'deepspeed': ds}))")
        rc, text = self.sh([sys.executable, "-c", code], timeout=300)
        info = {}
        for line in text.splitlines():
            if line.startswith("{"):
                info = json.loads(line)
        ok = rc == 0 and (info.get("cuda") is (not self.dry_run))
        self.record("env", ok, started, **info)

    def run_check(self, name: str, *extra: str, deepspeed: str | None = None) -> None:
        started = time.time()
        rc, text, out = self.train(name, *extra, deepspeed=deepspeed)
        detail = self.finished(rc, out)
        if deepspeed:  # NCCL_DEBUG=INFO (GPU mode): NCCL names itself when it sets up a communicator
            detail["nccl_seen"] = "NCCL INFO" in text
        self.record(name, detail.pop("ok"), started, **detail)

    def resume_check(self) -> None:
        import torch
        from safetensors.torch import load_file

        started = time.time()
        more = ("train.max_steps=6", "train.save_every_steps=2")
        rc_full, _, full = self.train("resume_full", *more)
        die = [str(ROOT / "bench" / "_train_then_die.py"), STAGES[1], "4"]
        rc_die, _, killed = self.train("resume_killed", *more, script=die)
        state_file = killed / "checkpoints" / "last" / "state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        rc_res, _, _ = self.train("resume_killed", *more, "--resume")
        detail = {"rc_uninterrupted": rc_full, "rc_killed": rc_die, "rc_resumed": rc_res,
                  "killed_at": [state.get("in_stage"), state.get("step")]}
        done_full, done_res = self.finished(rc_full, full), self.finished(rc_res, killed)
        ok = (rc_die == 137 and detail["killed_at"] == [STAGES[1], 4]
              and done_full["ok"] and done_res["ok"])
        name = f"stage-{len(STAGES):02d}-{STAGES[-1]}"
        a_path = full / "checkpoints" / name / "weights.safetensors"
        b_path = killed / "checkpoints" / name / "weights.safetensors"
        if ok and a_path.exists() and b_path.exists():
            a, b = load_file(str(a_path)), load_file(str(b_path))
            same_keys = sorted(a) == sorted(b)
            diff = max((float((a[k].float() - b[k].float()).abs().max()) for k in a if k in b),
                       default=float("nan"))
            exact = same_keys and all(a[k].equal(b[k]) for k in a)
            close = same_keys and all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3,
                                                     atol=1e-5) for k in a)
            detail.update(weights_exact=exact, weights_max_abs_diff=diff,
                          accuracy_matrix_equal=done_full.get("accuracy_matrix")
                          == done_res.get("accuracy_matrix"))
            ok = exact if self.dry_run else close
        else:
            ok = False
        self.record("resume_mid_stage", ok, started, **detail)

    def gpu_step_check(self) -> None:
        started = time.time()
        target = self.out / "gpu_step.json"
        shape = ["--shape", "tiny", "--steps", "1", "--warmup", "1", "--device", "cpu"] \
            if self.dry_run else ["--shape", "llava7b"]
        rc, text = self.sh([sys.executable, str(ROOT / "bench" / "gpu_step.py"), *shape,
                            "--json", str(target)], timeout=max(self.timeout, 540))
        detail: dict = {"rc": rc}
        if rc == 0 and target.exists():
            info = json.loads(target.read_text())
            detail.update(gpu=info["gpu"], ratios=info["ratios"],
                          rows=[{k: r[k] for k in ("regime", "side", "tokens_per_s", "mfu",
                                                   "peak_mem_gib")} for r in info["rows"]])
        self.record("gpu_step", rc == 0 and target.exists(), started, **detail)

    def run(self, only: list[str]) -> bool:
        table = {
            "env": self.env_check,
            "bf16_autocast": lambda: self.run_check("bf16_autocast", "train.precision=bf16"),
            "zero2": lambda: self.run_check("zero2", "train.precision=bf16", deepspeed="zero2"),
            "zero3": lambda: self.run_check("zero3", "train.precision=bf16", deepspeed="zero3"),
            "zero3_lwf_ewc": lambda: self.run_check(
                "zero3_lwf_ewc", "train.precision=bf16",
                f"methods={json.dumps([{'name': 'lwf'}, {'name': 'ewc'}])}", deepspeed="zero3"),
            "resume_mid_stage": self.resume_check,
            "gpu_step": self.gpu_step_check,
        }
        for name in only:
            try:
                table[name]()
            except Exception as exc:  # one broken check must not hide the others' results
                self.record(name, False, time.time(), error=f"{type(exc).__name__}: {exc}")
        return all(r["passed"] for r in self.records)


def default_out(dry_run: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    tag = "cpu-dry-run"
    if not dry_run:
        import torch

        if torch.cuda.is_available():
            tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", torch.cuda.get_device_name(0)).strip("-")
    return ROOT / "bench" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None,
                        help="a tiny benchmark (default: bench/.gpu-carry/data, else generated)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every check on CPU at tiny shapes (working order, no GPU claims)")
    parser.add_argument("--only", default=",".join(CHECKS),
                        help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per training run")
    args = parser.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in only if c not in CHECKS]
    if bad or not only:
        parser.error(f"--only: unknown {bad}; choose from {list(CHECKS)}")
    if not args.cpu_dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or pass --cpu-dry-run")
    out = args.out or default_out(args.cpu_dry_run)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        data = args.data or (CARRIED_DATA if (CARRIED_DATA / "benchmark.json").exists() else None)
        if data is None and any(c not in ("env", "gpu_step") for c in only):
            from mil_plugins.benchmark import make_benchmark

            data = work / "mcl-tiny"
            make_benchmark(data, size="tiny", seed=0)
        checker = Checker(out, data or work / "unused", args.cpu_dry_run, args.timeout, work)
        ok = checker.run(only)
    print(f"[gpu_check] {'all passed' if ok else 'FAILED'}; results in {out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

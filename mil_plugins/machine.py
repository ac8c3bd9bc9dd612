"""The machine a result was produced on, recorded beside it (``metrics.json``'s ``machine``).

The same recipe and seed give other bits on a CPU whose kernels use another instruction set (an
AVX2-only machine against an AVX-512 one: ``docs/results.md``), and an absolute time means
nothing without the machine, so every run says where it ran: the CPU's model, its vector
instruction sets, the instruction set torch's CPU kernels dispatch to, the cores this process may
use, torch's thread count, and the GPU when there is one.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: the CPU flags that change which kernels run (and so the bits and the speed)
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from ``/proc/cpuinfo``; empty where there is none (not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "", set()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return model or platform.processor() or "", set(flags)


def describe() -> dict:
    """This process's machine, as plain JSON values."""
    import torch

    model, flags = cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {
        "cpu": model,
        "cpu_flags": [f for f in VECTOR_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())
    return out

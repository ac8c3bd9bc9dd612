"""Every run records the machine it ran on (metrics.json's ``machine``)."""

from __future__ import annotations

import json

import torch

from mil_plugins import machine


def test_describe_names_the_cpu_its_vector_sets_and_torchs_threads():
    m = machine.describe()
    assert set(m) == {"cpu", "cpu_flags", "torch_cpu_capability", "cores", "torch_threads",
                      "torch", "python", "gpu"}
    assert m["torch_threads"] == torch.get_num_threads() and m["cores"] >= 1
    assert m["torch"] == torch.__version__
    assert m["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(m["cpu_flags"]) <= set(machine.VECTOR_FLAGS)
    json.dumps(m)  # plain JSON values


def test_flags_come_from_cpuinfo_in_a_fixed_order(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\n"
                    "flags\t\t: fpu avx512f sse4_2 avx2 avx\n")
    real_path = machine.Path
    monkeypatch.setattr(machine, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p))
    m = machine.describe()
    assert m["cpu"] == "Some CPU 9000"
    assert m["cpu_flags"] == ["sse4_2", "avx", "avx2", "avx512f"]

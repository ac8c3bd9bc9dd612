"""TME's routing read back from a finished run. (The stage-boundary resume of ``tir``, ``tme`` and
``harmony``, their descriptors, decisions and statistics coming back from the checkpoint, is
checked with the other stateful methods' in ``test_methods_e2e.py``, registry-parametrised.)"""

from __future__ import annotations

from test_methods_e2e import _one_thread, data_root  # noqa: F401  (fixtures)
from test_methods_e2e import pytestmark  # noqa: F401  (slow; needs recipes/quickstart.yaml)


def test_tme_routes_each_stages_test_inputs_to_its_own_branch(data_root, tmp_path):  # noqa: F811
    """``bench/tme_routing.py`` on a finished 2-stage run: from their own descriptors, every test
    input of each stage takes the branch that stage trained."""
    import sys

    from test_methods_e2e import ROOT, _args, _run

    sys.path.insert(0, str(ROOT / "bench"))
    from tme_routing import routing

    out = tmp_path / "out"
    _run(_args(data_root, out, "tme"))
    stage2 = next(p for p in (out / "checkpoints").iterdir() if p.name.startswith("stage-02-"))
    result = routing(stage2)
    assert len(result["stages"]) == 2
    for name, row in result["stages"].items():
        assert row["n"] > 0 and row["own_share"] == 1.0, (name, row)
    # the docs' table of it: each stage's decision beside where its inputs went
    from mil_plugins.compare import render_view

    table = render_view(result, "tme_routing")
    first, second = result["stages"]
    assert f"| {first} | add | stage0 |" in table
    assert f"| {second} | " in table and "100.0%" in table

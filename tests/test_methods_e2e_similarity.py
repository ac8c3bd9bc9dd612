"""Stage-boundary resume of ``tir``, ``tme`` and ``harmony`` (their descriptors, decisions and
statistics come back from the checkpoint): the same check as ``test_methods_e2e.py`` runs for the
other stateful methods. Mid-stage resume and the two-stage run are registry-parametrised there."""

from __future__ import annotations

import pytest

from test_methods_e2e import _one_thread, data_root  # noqa: F401  (fixtures)
from test_methods_e2e import pytestmark  # noqa: F401  (slow; needs recipes/quickstart.yaml)
from test_methods_e2e import test_resume_from_stage_one_is_bit_identical as _resume_check


@pytest.mark.parametrize("method", ["tir", "tme", "harmony"])
def test_resume_from_stage_one_is_bit_identical(method, data_root, tmp_path):  # noqa: F811
    _resume_check(method, data_root, tmp_path)

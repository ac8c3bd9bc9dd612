"""Test tiers and the inputs every worker shares.

* ``pytest`` runs the default tier; ``pytest --extended`` adds the tests marked ``extended`` (the
  full method x launcher matrix, long regimes; docs/testing.md lists them).
* ``pytest -n 2`` (the README's command) spreads the tests over two pytest-xdist workers; expensive
  inputs are built once for all of them (``_shared``).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true", default=False,
                     help="also run the extended tier (tests marked `extended`; docs/testing.md)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--extended") or "extended" in (config.getoption("-m") or ""):
        return  # everything, or what the -m expression selects
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("extended") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept

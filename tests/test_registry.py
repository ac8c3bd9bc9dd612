"""The one Registry: discovery without import, lazy load, broken plugins, duplicates."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import pytest

from mil_plugins.methods.base import Method, check_method_plugin
from mil_plugins.modality import ModalityPlugin, check_modality_plugin
from mil_plugins.plugins import PROJECTORS, all_records
from mil_plugins.registry import PluginError, Registry


class FakeDist:
    def __init__(self, name, version):
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    """Quacks like importlib.metadata.EntryPoint; counts loads."""

    def __init__(self, name, value, obj=None, exc=None, dist=("thirdparty", "1.2.3")):
        self.name, self.value, self._obj, self._exc = name, value, obj, exc
        self.dist = FakeDist(*dist)
        self.loads = 0

    def load(self):
        self.loads += 1
        if self._exc:
            raise self._exc
        return self._obj


class Good(ModalityPlugin):
    name = "good"
    placeholder = "<good>"


def make_registry(*eps):
    reg = Registry("modality", "test.group", check_modality_plugin)
    reg.discover(eps)
    return reg


def test_discovery_imports_nothing_until_asked():
    ep = FakeEntryPoint("good", "pkg:Good", obj=Good)
    reg = make_registry(ep)
    assert reg.names() == ["good"] and ep.loads == 0
    assert reg.get("good") is Good and ep.loads == 1
    reg.get("good")
    assert ep.loads == 1


def test_broken_plugin_does_not_take_others_down():
    good = FakeEntryPoint("good", "pkg:Good", obj=Good)
    broken = FakeEntryPoint("broken", "badpkg.mod:Thing", exc=ImportError("No module named 'x'"),
                            dist=("badpkg", "0.9"))
    reg = make_registry(good, broken)
    assert reg.get("good") is Good
    with pytest.raises(PluginError) as err:
        reg.get("broken")
    msg = str(err.value)
    for part in ("broken", "badpkg", "0.9", "badpkg.mod:Thing", "ImportError", "No module named"):
        assert part in msg
    statuses = {r.name: r.status for r in reg.records()}
    assert statuses == {"good": "loaded", "broken": "failed"}


def test_wrong_type_is_a_failed_plugin():
    reg = make_registry(FakeEntryPoint("notaplugin", "pkg:func", obj=lambda: None))
    with pytest.raises(PluginError, match="wrong type.*ModalityPlugin"):
        reg.get("notaplugin")


def test_name_mismatch_is_rejected():
    reg = make_registry(FakeEntryPoint("other", "pkg:Good", obj=Good))
    with pytest.raises(PluginError, match="entry point is named 'other'"):
        reg.get("other")


def test_duplicate_names_are_an_error_for_both():
    a = FakeEntryPoint("good", "pkg_a:Good", obj=Good, dist=("pkg-a", "1"))
    b = FakeEntryPoint("good", "pkg_b:Good", obj=Good, dist=("pkg-b", "2"))
    reg = make_registry(a, b)
    with pytest.raises(PluginError, match="duplicate modality name 'good'.*pkg-b"):
        reg.get("good")
    records = reg.records()
    assert len(records) == 2 and all(r.status == "failed" for r in records)


def test_same_distribution_seen_twice_is_not_a_duplicate():
    a = FakeEntryPoint("good", "pkg:Good", obj=Good)
    b = FakeEntryPoint("good", "pkg:Good", obj=Good)
    assert make_registry(a, b).get("good") is Good


def test_register_and_duplicate_register():
    reg = make_registry()
    reg.register("good", Good)
    with pytest.raises(PluginError, match="duplicate"):
        reg.register("good", Good)
    with pytest.raises(PluginError, match="wrong type"):
        reg.register("bad", object())


def test_unknown_name_lists_registered_and_suggests():
    reg = make_registry(FakeEntryPoint("good", "pkg:Good", obj=Good))
    with pytest.raises(PluginError, match=r"unknown modality 'god'; did you mean 'good'\? Registered: good"):
        reg.get("god")


def test_method_hook_misspelling_is_caught():
    class Typo(Method):
        name = "typo"

        def loss_term(self, ctx, batch, outputs):  # should be loss_terms
            return {}

    with pytest.raises(TypeError, match="loss_terms"):
        check_method_plugin("typo", Typo)


def test_builtins_are_entry_points_of_our_distribution():
    eps = {ep.name: ep for ep in metadata.entry_points(group="mil_plugins.projectors")}
    assert {"linear", "identity", "mlpNx_gelu"} <= set(eps)
    assert eps["linear"].dist.metadata["Name"] == "mil-plugins"
    for name in ("linear", "identity", "mlpNx_gelu"):
        assert callable(PROJECTORS.get(name))


def test_all_records_have_the_documented_keys():
    for row in all_records():
        assert set(row) >= {"kind", "name", "distribution", "version", "status", "error"}


def test_mil_plugins_json_cli():
    out = subprocess.run([sys.executable, "-m", "mil_plugins.cli", "plugins", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"modality", "projector", "method", "aggregator"}
    linear = next(r for r in rows if r["name"] == "linear")
    assert linear["distribution"] == "mil-plugins" and linear["status"] == "loaded"

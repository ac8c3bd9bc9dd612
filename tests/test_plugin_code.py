"""The plugin's code is part of the feature-cache key: an edited plugin never serves stale features."""

from __future__ import annotations

import importlib
import sys
import textwrap

import numpy as np
import pytest
import torch

from mil_plugins.cache import FeatureCache, cached_encode, encoder_fingerprint
from mil_plugins.plugin_code import code_fingerprint, package_sources
from mil_plugins.plugins import MODALITIES

PLUGIN = '''
import numpy as np
import torch
from torch import nn

from mil_plugins.modality import ModalityEncoder, ModalityPlugin
from .prep import scale


class Encoder(ModalityEncoder):
    hidden_size, num_tokens = 3, 1

    def forward(self, x):
        return x.unsqueeze(1)


class EditablePlugin(ModalityPlugin):
    name = "editable"
    placeholder = "<editable>"

    def preprocess(self, path):
        return torch.from_numpy(np.load(path)).float() * scale()

    def build_encoder(self):
        return Encoder()
'''


def _write_package(root, scale: float):
    pkg = root / "editable_plugin_pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (pkg / "prep.py").write_text(f"def scale():\n    return {scale!r}\n")
    (pkg / "unused.py").write_text("X = 1\n")  # not imported: not part of the hash


def _import_fresh():
    for name in [n for n in sys.modules if n.split(".")[0] == "editable_plugin_pkg"]:
        del sys.modules[name]
    importlib.invalidate_caches()
    return importlib.import_module("editable_plugin_pkg").EditablePlugin


@pytest.fixture
def editable(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # an edit within a second: no stale .pyc
    yield tmp_path
    MODALITIES.unregister("editable")
    for name in [n for n in sys.modules if n.split(".")[0] == "editable_plugin_pkg"]:
        del sys.modules[name]


def _encode(cache, path):
    """Register the freshly imported plugin, fetch it by name, encode ``path`` through the cache."""
    MODALITIES.register("editable", _import_fresh(), replace=True)
    plugin = MODALITIES.get("editable")()
    encoder = plugin.build_encoder()
    return cached_encode(cache, plugin, encoder, path, encoder_fingerprint(encoder))


def test_editing_a_plugin_misses_the_cache(editable):
    _write_package(editable, 1.0)
    x = editable / "x.npy"
    np.save(x, np.array([1.0, 2.0, 3.0], dtype=np.float32))
    cache = FeatureCache(editable / "cache")

    first = _encode(cache, x)
    assert (cache.hits, cache.misses) == (0, 1)
    assert torch.equal(_encode(cache, x), first)                 # unchanged code re-imported: a hit
    assert (cache.hits, cache.misses) == (1, 1)

    _write_package(editable, 2.0)                                # edit a module the plugin imports
    edited = _encode(cache, x)
    assert (cache.hits, cache.misses) == (1, 2)                  # a miss, not the stale features
    assert torch.equal(edited, 2 * first)

    (editable / "editable_plugin_pkg" / "unused.py").write_text("X = 2\n")
    _encode(cache, x)
    assert (cache.hits, cache.misses) == (2, 2)                  # a module it does not import


def test_package_sources_follow_imports_within_the_package():
    names = set(package_sources("encoders.image"))
    assert {"encoders.image", "encoders._towers", "encoders._timm_tower", "encoders._common"} <= names
    assert not any(n.startswith(("mil_plugins", "torch")) for n in names)
    from encoders.audio import AudioPlugin
    from encoders.image import ImagePlugin

    assert code_fingerprint(ImagePlugin) != code_fingerprint(AudioPlugin)
    assert code_fingerprint(ImagePlugin) == code_fingerprint(ImagePlugin)
    assert len(code_fingerprint(ImagePlugin)) == 16


def test_class_without_a_source_file_still_fingerprints():
    cls = type("Dynamic", (), {"__module__": "no_such_module_here"})
    assert len(code_fingerprint(cls)) == 16

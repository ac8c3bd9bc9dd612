"""The method dispatcher (methods/dispatch.py), method optimiser groups, checkpointed method
buffers, and the registry as the ground floor (importing it loads no method/modality interface)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from mil_plugins.methods.base import Method
from mil_plugins.methods.dispatch import MethodHooks

ROOT = Path(__file__).resolve().parents[1]


class Recorder(Method):
    name = "rec"

    def __init__(self, name="rec", log=None, groups=()):
        super().__init__()
        self.name, self.log, self.groups = name, log if log is not None else [], list(groups)

    def before_stage(self, ctx, stage):
        self.log.append((self.name, "before_stage", stage))

    def train_samples(self, ctx, stage, samples):
        return samples + [self.name]

    def trainable(self, ctx, stage, names):
        return names | {self.name}

    def loss_terms(self, ctx, batch, outputs):
        return {"t": torch.tensor(1.0)}

    def param_groups(self, ctx, stage):
        return self.groups

    def state_dict(self):
        return {"me": self.name}

    def load_state_dict(self, state):
        self.log.append((self.name, "load", state))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_hooks_run_in_recipe_order_and_chain():
    log = []
    ctx = types.SimpleNamespace(stage="s")
    hooks = MethodHooks([Recorder("a", log), Recorder("b", log)], ctx)
    hooks.before_stage("s")
    assert [e[0] for e in log] == ["a", "b"]
    assert hooks.train_samples("s", ["x"]) == ["x", "a", "b"]
    assert hooks.trainable("s", {"x"}) == {"x", "a", "b"}
    assert set(hooks.loss_terms({}, None)) == {"a/t", "b/t"}
    assert hooks.state_dict() == {"a": {"me": "a"}, "b": {"me": "b"}}
    hooks.load_state_dict({"a": {"k": 1}})
    assert ("a", "load", {"k": 1}) in log and ("b", "load", {}) in log
    assert MethodHooks.of(hooks, ctx) is hooks and MethodHooks.of([], ctx).names == []


def test_param_groups_move_claimed_parameters_into_their_own_groups():
    model = _model()
    model[1].bias.requires_grad_(False)
    base = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 0.1,
             "weight_decay": 0.01}]
    ctx = types.SimpleNamespace(stage="s")
    m = Recorder("router", groups=[{"names": ["1.weight", "1.bias"], "lr_scale": 10.0}])
    groups = MethodHooks([m], ctx).param_groups(model, base, lr=0.1, weight_decay=0.01)
    assert len(groups) == 2
    assert groups[0]["params"] == [model[0].weight, model[0].bias] and groups[0]["lr"] == 0.1
    assert groups[1]["params"] == [model[1].weight]  # the frozen bias is left out
    assert groups[1]["lr"] == pytest.approx(1.0) and groups[1]["weight_decay"] == 0.01
    absolute = Recorder("x", groups=[{"names": ["0.bias"], "lr": 0.5, "weight_decay": 0.0}])
    g2 = MethodHooks([absolute], ctx).param_groups(model, base, lr=0.1)
    assert g2[-1] == {"params": [model[0].bias], "lr": 0.5, "weight_decay": 0.0}
    torch.optim.AdamW(groups)  # a valid optimiser spec
    with pytest.raises(KeyError, match="router.*not parameters"):
        MethodHooks([Recorder("router", groups=[{"names": ["2.weight"]}])], ctx).param_groups(
            model, base, 0.1)
    twice = [Recorder("a", groups=[{"names": ["0.weight"]}]),
             Recorder("b", groups=[{"names": ["0.weight"]}])]
    with pytest.raises(ValueError, match="claimed by the param groups of both 'a' and 'b'"):
        MethodHooks(twice, ctx).param_groups(model, base, 0.1)
    with pytest.raises(ValueError, match="names"):
        MethodHooks([Recorder("a", groups=[{"names": ["0.weight"], "lrr": 1}])], ctx).param_groups(
            model, base, 0.1)


def test_method_buffers_are_checkpointed_and_restored():
    from mil_plugins.engine.session import Session

    model = _model()
    fake = types.SimpleNamespace(model=model, base_names={n for n, _ in model.named_parameters()},
                                 base_buffers=set(), dist=types.SimpleNamespace(device="cpu"),
                                 hooks=MethodHooks([], None))
    fake._method_buffers = types.MethodType(Session._method_buffers, fake)
    extra = nn.Module()
    extra.register_buffer("counts", torch.tensor([1.0, 2.0]))
    extra.register_buffer("scratch", torch.zeros(2), persistent=False)
    model.add_module("method_state", extra)
    saved = Session.trained_weights(fake, set())
    assert set(saved) == {"method_state.counts"}  # persistent buffers only, no base parameter
    saved = {k: v.clone() + 5 for k, v in saved.items()}
    Session.restore(fake, {"methods": {}, "weights": saved})
    assert torch.equal(model.method_state.counts, torch.tensor([6.0, 7.0]))


def test_registry_imports_no_interface_and_no_torch():
    code = ("import sys, mil_plugins.plugins; "
            "print(sorted(m for m in ('torch', 'mil_plugins.methods.base', 'mil_plugins.modality') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    listing = ("import sys, runpy; sys.argv = ['mil', 'plugins', '--no-load', '--kind', 'method']; "
               "import mil_plugins.cli as c; rc = c.main(); print('torch' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", listing], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "finetune" in out.stdout and out.stdout.strip().endswith("False 0")


def test_a_plugin_is_type_checked_when_it_is_registered_or_loaded():
    from mil_plugins.plugins import METHODS
    from mil_plugins.registry import PluginError

    with pytest.raises(PluginError, match="expected a subclass of mil_plugins.methods.base.Method"):
        METHODS.register("not_a_method", object)
    assert "not_a_method" not in METHODS.names()

"""Every registered method (built-in or third-party) loads, passes the registry's check and is
usable with its defaults: options complete, state JSON/checkpoint-encodable, conflicts explained."""

from __future__ import annotations

import json

import pytest

from mil_plugins.engine.checkpoint import split_tensors
from mil_plugins.methods.base import HOOKS, Method, check_composition, check_method_plugin
from mil_plugins.plugins import METHODS

BUILTIN = {"finetune", "joint", "replay", "ewc", "lwf", "expansion"}


def test_builtin_methods_are_registered():
    assert BUILTIN <= set(METHODS.names())


@pytest.mark.parametrize("name", METHODS.names())
def test_registered_method_is_valid_and_instantiable(name):
    cls = METHODS.get(name)
    check_method_plugin(name, cls)
    assert issubclass(cls, Method) and cls.name == name
    method = cls()
    assert method.options == dict(cls.default_options)
    assert method.options is not cls.default_options
    # an unknown option is rejected with the valid ones listed
    with pytest.raises(ValueError, match="unknown option"):
        cls(**{"no_such_option_xyz": 1})
    # every option can be passed explicitly with its default value
    cls(**dict(cls.default_options))
    # the state of an untouched instance is checkpoint-encodable and loads back
    state = method.state_dict()
    assert isinstance(state, dict)
    json.dumps(split_tensors(state, {}))
    cls().load_state_dict(json.loads(json.dumps(split_tensors(state, {}))))
    # conflicts carry a reason; the method alone composes
    for other, why in cls.conflicts.items():
        assert isinstance(other, str) and other != name
        assert isinstance(why, str) and why.strip()
    check_composition([method])
    # every hook the class defines is a known one (check_method_plugin catches close misspellings)
    for attr, value in vars(cls).items():
        if callable(value) and not attr.startswith("_") and attr in dir(Method):
            assert attr in HOOKS or attr in vars(Method), attr


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_conflicts_are_declared_on_both_sides(name):
    cls = METHODS.get(name)
    for other in cls.conflicts:
        if other in BUILTIN:
            assert name in METHODS.get(other).conflicts, (name, other)

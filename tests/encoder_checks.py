"""Shared assertions of the encoder tests."""

from __future__ import annotations

import pytest

from mil_plugins.modality import ModalityInputError


def assert_bad_inputs(plugin, folder, cases: dict[str, str]) -> None:
    """Each file ``folder/name`` must raise a ModalityInputError naming the file, the plugin's
    modality and a problem containing ``cases[name]``."""
    for name, problem in cases.items():
        path = folder / name
        with pytest.raises(ModalityInputError) as info:
            plugin.preprocess(path)
        err = info.value
        assert str(path) in str(err) and err.modality == plugin.name
        assert problem in err.problem, (name, err.problem)

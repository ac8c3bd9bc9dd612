"""Shared assertions of the encoder tests."""

from __future__ import annotations

import numpy as np
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


def nearest_centroid_loo(features: np.ndarray, labels: list) -> float:
    """Leave-one-out nearest-centroid accuracy: does an encoder keep classes apart?"""
    labels = np.asarray(labels)
    hits = 0
    for i in range(len(features)):
        rest = np.arange(len(features)) != i
        cents = {c: features[rest & (labels == c)].mean(0) for c in set(labels)}
        hits += min(cents, key=lambda c: np.linalg.norm(features[i] - cents[c])) == labels[i]
    return hits / len(features)

"""Small fake modality plugins for the data tests (no real decoders needed).

    vec  manifest key "vec",   placeholder "<vec>": a .npy vector of fixed length ``dim``
    snd  manifest key "sound", placeholder "<snd>": a .npy 1-D signal of any length; its
         ``collate`` pads to the longest (proves the collator uses ``plugin.collate``)

``fake_modalities`` (a pytest fixture) registers both in ``MODALITIES`` and removes them after.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mil_plugins.modality import ModalityEncoder, ModalityInputError, ModalityPlugin
from mil_plugins.plugins import MODALITIES


def _load_npy(path, modality: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ModalityInputError(path, "file not found", modality)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ModalityInputError(path, f"not a .npy array ({type(exc).__name__})", modality) from None


class _Encoder(ModalityEncoder):
    def __init__(self, dim: int, hidden: int = 8, tokens: int = 2):
        super().__init__()
        self.hidden_size, self.num_tokens = hidden, tokens
        self.proj = nn.Linear(dim, hidden * tokens)

    def forward(self, x):
        return self.proj(x).view(x.shape[0], self.num_tokens, self.hidden_size)


class VecPlugin(ModalityPlugin):
    name = "vec"
    placeholder = "<vec>"
    extensions = (".npy",)
    default_options = {"dim": 4}

    def preprocess(self, path):
        arr = _load_npy(path, self.name)
        if arr.shape != (self.options["dim"],):
            raise ModalityInputError(path, f"expected shape ({self.options['dim']},), got "
                                           f"{arr.shape}", self.name)
        return torch.from_numpy(arr.astype(np.float32))

    def build_encoder(self):
        return _Encoder(self.options["dim"])


class SndPlugin(ModalityPlugin):
    name = "snd"
    key = "sound"
    placeholder = "<snd>"
    extensions = (".npy",)
    default_options = {}

    def preprocess(self, path):
        arr = _load_npy(path, self.name)
        if arr.ndim != 1 or arr.size == 0:
            raise ModalityInputError(path, f"expected a non-empty 1-D signal, got {arr.shape}",
                                     self.name)
        return torch.from_numpy(arr.astype(np.float32))

    def collate(self, tensors):
        n = max(len(t) for t in tensors)
        return torch.stack([torch.nn.functional.pad(t, (0, n - len(t))) for t in tensors])

    def build_encoder(self):
        return _Encoder(1)


FAKE_PLUGINS = {"vec": VecPlugin, "snd": SndPlugin}


@pytest.fixture
def fake_modalities():
    """Register the fake plugins in MODALITIES for one test; yields name -> instance."""
    for name, cls in FAKE_PLUGINS.items():
        MODALITIES.register(name, cls, replace=True)
    try:
        yield {name: cls() for name, cls in FAKE_PLUGINS.items()}
    finally:
        for name in FAKE_PLUGINS:
            MODALITIES.unregister(name)


def plugins() -> dict:
    return {name: cls() for name, cls in FAKE_PLUGINS.items()}


# -- writing data -------------------------------------------------------------------------------
def vec(root: Path, rel: str, dim: int = 4, value: float = 1.0) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.full(dim, value, dtype=np.float32))
    return rel


def snd(root: Path, rel: str, n: int = 5, value: float = 1.0) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.full(n, value, dtype=np.float32))
    return rel


def conv(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path

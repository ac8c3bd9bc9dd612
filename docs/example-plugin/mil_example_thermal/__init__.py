"""Thermal modality: a 2-D temperature map (kelvin) in a ``.npy`` file -> patch tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mil_plugins.modality import ModalityEncoder, ModalityInputError, ModalityPlugin


class ThermalEncoder(ModalityEncoder):
    def __init__(self, size: int, patch: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_tokens = (size // patch) ** 2
        self.patch = nn.Conv2d(1, hidden_size, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, S, S] -> [B, T, D]
        return self.patch(x).flatten(2).transpose(1, 2)


class ThermalPlugin(ModalityPlugin):
    name = "thermal"
    key = "thermal"
    placeholder = "<thermal>"
    default_projector = "mlp2x_gelu"
    extensions = (".npy",)
    default_options = {"size": 16, "patch": 4, "hidden_size": 32, "t_min": 250.0, "t_max": 350.0,
                       "trainable": False}

    def preprocess(self, path: str | Path) -> torch.Tensor:
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ModalityInputError(path, "file not found", self.name) from None
        except Exception as exc:
            raise ModalityInputError(path, f"not a readable .npy array ({exc})", self.name) from None
        if array.ndim != 2 or not np.isfinite(array).all():
            raise ModalityInputError(path, f"expected a finite 2-D array, got shape {array.shape}",
                                     self.name)
        lo, hi = self.options["t_min"], self.options["t_max"]
        x = torch.from_numpy(((array - lo) / (hi - lo)).astype(np.float32))[None, None]
        size = self.options["size"]
        return nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                         align_corners=False)[0]

    def build_encoder(self) -> ThermalEncoder:
        o = self.options
        return ThermalEncoder(o["size"], o["patch"], o["hidden_size"])

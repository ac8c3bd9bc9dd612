"""The mechanism of the ``harmony`` method (:mod:`mil_plugins.methods.harmony`): the per-modality
low-rank modulators on the connector (:class:`Modulator`, :class:`HarmonyStack` and its forward
hooks) and the running feature statistics (:func:`merge_stats`)."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

NAME = "harmony"
TERMS = ("compat", "feature", "logit", "proto")


class Modulator(nn.Module):
    """``h * (1 + U_g D h) + U_b D h``; ``U_g``, ``U_b`` start at zero (an identity at first)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.gamma = nn.Linear(rank, dim, bias=False)
        self.beta = nn.Linear(rank, dim, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)
        r = self.down(x)
        return (x * (1 + self.gamma(r)) + self.beta(r)).to(h.dtype)


class HarmonyStack(nn.Module):
    """The modulators, hooked into the connector (``connector.harmony``). Hooks are bound methods,
    so the teacher (a deep copy of the model) modulates with its own copy."""

    def __init__(self, modalities: list[str], dim: int, rank: int):
        super().__init__()
        self.modulators = nn.ModuleDict({m: Modulator(dim, rank) for m in modalities})
        self.current: str | None = None
        self.last: dict[str, torch.Tensor] = {}  # modality -> modulated output of its last projection

    def attach(self, connector: nn.Module) -> None:
        for modality, layer in connector.input_layers.items():
            layer.register_forward_pre_hook(functools.partial(self._enter, modality))
        connector.shared.register_forward_hook(self._leave)

    def _enter(self, modality: str, module: nn.Module, args: Any) -> None:
        self.current = modality

    def _leave(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        m, self.current = self.current, None
        if m is None or m not in self.modulators:
            return output
        out = self.modulators[m](output)
        if torch.is_grad_enabled():
            self.last[m] = out
        return out


def _moments(x: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over samples ``[N, T, D] -> [T', D]`` (``T' = T`` per token, else 1)."""
    x = x.float()
    if not per_token:
        x = x.reshape(-1, 1, x.shape[-1])
    return x.mean(0), x.std(0, unbiased=False)


def merge_stats(a: dict | None, b: dict) -> dict:
    """Count-weighted merge of two ``{"n", "<key>_mean", "<key>_std"}`` statistics (pooled moments)."""
    if not a:
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()}
    na, nb = float(a["n"]), float(b["n"])
    out: dict[str, Any] = {"n": int(na + nb)}
    for key in {k[:-5] for k in b if k.endswith("_mean")}:
        ma, mb = a[f"{key}_mean"], b[f"{key}_mean"]
        if ma.shape != mb.shape:
            raise ValueError(f"method {NAME!r}: statistics {key!r} of shapes {tuple(ma.shape)} and "
                             f"{tuple(mb.shape)} cannot be merged (connector changed?)")
        va, vb = a[f"{key}_std"] ** 2, b[f"{key}_std"] ** 2
        mean = (na * ma + nb * mb) / (na + nb)
        var = (na * (va + ma ** 2) + nb * (vb + mb ** 2)) / (na + nb) - mean ** 2
        out[f"{key}_mean"], out[f"{key}_std"] = mean, var.clamp(min=0).sqrt()
    return out

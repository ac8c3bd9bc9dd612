"""One dispatcher that calls each hook of every method in the recipe, in recipe order.

The engine (stage runner, training loop, evaluation) holds a :class:`MethodHooks` and calls
``hooks.<hook>(...)`` once where it used to loop over the methods; a federated runner can share the
same object. Chained hooks (``train_samples``, ``trainable``) pass each method's result to the
next; ``loss_terms`` are collected under ``"<method>/<term>"``; ``param_groups`` are checked and
merged into the engine's optimiser groups.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


class MethodHooks:
    """The methods of a recipe behind one object. ``ctx`` is the shared
    :class:`~mil_plugins.methods.context.MethodContext`."""

    def __init__(self, methods: Iterable[Any], ctx: Any):
        self.methods = list(methods)
        self.ctx = ctx

    @classmethod
    def of(cls, methods: Any, ctx: Any) -> "MethodHooks":
        """``methods`` as a dispatcher (a dispatcher is returned as it is)."""
        return methods if isinstance(methods, MethodHooks) else cls(methods or (), ctx)

    def __iter__(self):
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    @property
    def uses_teacher(self) -> bool:
        """Whether any method asks for ``ctx.teacher()`` (else the engine keeps none)."""
        return any(getattr(m, "uses_teacher", False) for m in self.methods)

    # ---- hooks --------------------------------------------------------------------------------
    def setup(self) -> None:
        for m in self.methods:
            m.setup(self.ctx)

    def before_stage(self, stage) -> None:
        for m in self.methods:
            m.before_stage(self.ctx, stage)

    def train_samples(self, stage, samples: list) -> list:
        for m in self.methods:
            samples = m.train_samples(self.ctx, stage, samples)
        return samples

    def trainable(self, stage, names: set[str]) -> set[str]:
        for m in self.methods:
            names = set(m.trainable(self.ctx, stage, set(names)))
        return names

    def before_forward(self, batch: dict) -> None:
        for m in self.methods:
            m.before_forward(self.ctx, batch)

    def loss_terms(self, batch: dict, outputs: Any) -> dict[str, torch.Tensor]:
        """``{"<method>/<term>": scalar}`` of every method."""
        terms: dict[str, torch.Tensor] = {}
        for m in self.methods:
            for name, value in (m.loss_terms(self.ctx, batch, outputs) or {}).items():
                terms[f"{m.name}/{name}"] = value
        return terms

    def after_step(self, stage, step: int) -> None:
        for m in self.methods:
            m.after_step(self.ctx, stage, step)

    def after_epoch(self, stage, epoch: int) -> None:
        for m in self.methods:
            m.after_epoch(self.ctx, stage, epoch)

    def after_stage(self, stage) -> None:
        for m in self.methods:
            m.after_stage(self.ctx, stage)

    def state_dict(self) -> dict[str, Any]:
        return {m.name: m.state_dict() for m in self.methods}

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for m in self.methods:
            m.load_state_dict(states.get(m.name, {}))

    # ---- optimiser groups ---------------------------------------------------------------------
    def param_groups(self, model: torch.nn.Module, groups: list[dict], lr: float,
                     weight_decay: float = 0.0) -> list[dict]:
        """The engine's AdamW ``groups`` with the parameters that methods claim (their
        ``param_groups`` hook: ``[{"names": [...], "lr": ..., "weight_decay": ...}]``, ``lr``
        absolute or ``lr_scale`` relative to the stage's ``lr``; ``weight_decay`` defaults to the
        recipe's) moved into groups of their own.
        Claimed parameters that are frozen this stage are left out; a name that is not a parameter,
        or one claimed twice, is an error naming the method."""
        params = dict(model.named_parameters())
        claimed: dict[int, str] = {}
        extra: list[dict] = []
        for m in self.methods:
            for spec in m.param_groups(self.ctx, self.ctx.stage) or []:
                unknown = set(spec) - {"names", "lr", "lr_scale", "weight_decay"}
                names = list(spec.get("names") or [])
                missing = [n for n in names if n not in params]
                if missing:
                    raise KeyError(f"method {m.name!r}: param_groups names that are not parameters "
                                   f"of the model: {missing[:3]}")
                if unknown or ("lr" in spec and "lr_scale" in spec):
                    raise ValueError(f"method {m.name!r}: a param group has 'names' and one of "
                                     f"'lr' / 'lr_scale', plus optional 'weight_decay'")
                mine = []
                for n in names:
                    p = params[n]
                    if not p.requires_grad:
                        continue
                    if id(p) in claimed:
                        raise ValueError(f"parameter {n!r} is claimed by the param groups of both "
                                         f"{claimed[id(p)]!r} and {m.name!r}")
                    claimed[id(p)] = m.name
                    mine.append(p)
                if not mine:
                    continue
                own_lr = float(spec["lr"]) if "lr" in spec else lr * float(spec.get("lr_scale", 1.0))
                group = {"params": mine, "lr": own_lr}
                group["weight_decay"] = float(spec.get("weight_decay", weight_decay))
                extra.append(group)
        if not claimed:
            return groups
        out = []
        for g in groups:
            rest = [p for p in g["params"] if id(p) not in claimed]
            if rest:
                out.append({**g, "params": rest})
        return out + extra

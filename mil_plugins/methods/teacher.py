"""The frozen pre-stage model a distilling method compares against (``ctx.teacher()``).

The engine keeps a teacher only when a method declares ``uses_teacher = True``. A stage changes
only the parameters it trains, so the teacher needs its own copy of those alone (their values at
the start of the stage); every frozen parameter is *shared* with the student (the same tensor, not
a copy). At 7B with LoRA that is a few MB instead of a second model.

Life of a :class:`TeacherSource` within one stage:

1. the engine creates it after ``before_stage`` (the model is the stage-start model);
2. :meth:`seal` is called with the stage's trainable names just before training starts (the
   weights have not moved yet) and clones those parameters -- or, on a mid-stage ``--resume``,
   takes their stage-start values from the checkpoint (:meth:`tensors` is saved with every
   mid-stage checkpoint), so the teacher is the stage-start model, not the half-trained one;
3. :meth:`get` builds the frozen module on first use.

A teacher asked for before :meth:`seal` (e.g. from ``train_samples``, when the stage's trainable set
is not known yet) is a full frozen copy of the model as it is then (the stage-start model).
"""

from __future__ import annotations

import copy

import torch


class TeacherSource:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.saved: dict[str, torch.Tensor] | None = None  # stage-start values of trained params
        self._teacher: torch.nn.Module | None = None

    @property
    def sealed(self) -> bool:
        return self.saved is not None

    def seal(self, names, saved: dict[str, torch.Tensor] | None = None) -> None:
        """Remember the stage-start values of ``names`` (now, or ``saved`` from a checkpoint)."""
        if self.sealed:
            return
        params = dict(self.model.named_parameters())
        if saved is not None:
            unknown = sorted(set(saved) - set(params))
            if unknown:
                raise KeyError(f"teacher weights in the checkpoint that the model lacks: {unknown[:3]}")
            missing = sorted(set(names) - set(saved))
            if missing:
                raise KeyError(f"the checkpoint's teacher weights lack trainable parameters "
                               f"{missing[:3]} (was the recipe or a method changed?)")
            self.saved = {k: v.detach().to(device=params[k].device, dtype=params[k].dtype).clone()
                          for k, v in saved.items()}
        else:
            self.saved = {k: params[k].detach().clone() for k in sorted(names) if k in params}
        # a teacher built before this (a full copy) is the stage-start model already: kept

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a mid-stage checkpoint must keep to rebuild the teacher on resume."""
        return dict(self.saved or {})

    def get(self) -> torch.nn.Module:
        if self._teacher is None:
            self._teacher = self._build()
        return self._teacher

    def _build(self) -> torch.nn.Module:
        memo: dict[int, object] = {}
        if self.sealed:
            # frozen parameters are shared; the trained ones get their stage-start values
            for name, p in self.model.named_parameters():
                if name in self.saved:
                    memo[id(p)] = torch.nn.Parameter(self.saved[name], requires_grad=False)
                else:
                    memo[id(p)] = p
        twin = copy.deepcopy(self.model, memo)
        twin.eval()
        for name, p in twin.named_parameters():
            if not self.sealed or name in self.saved:
                p.requires_grad_(False)
        return twin

"""What method hooks see: the current stage and a context with the model and helpers.

These types belong to the methods (the engine builds them and hands them over), so that the
engine imports the methods and never the reverse."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class Stage:
    index: int             # position in the recipe's stage list (warm-up: -1)
    name: str
    modality: str | None   # None: text only
    train_samples: list = field(default_factory=list)
    test_samples: list = field(default_factory=list)
    config: dict = field(default_factory=dict)  # the recipe's stage entry, defaults filled


@dataclass
class MethodContext:
    """Shared by every hook. ``model`` is the unwrapped MultimodalLM; ``stages`` every stage of the
    recipe (with samples loaded once the stage has begun); ``seen`` the stages trained so far."""

    model: Any
    recipe: dict
    stages: list[Stage]
    dist: Any
    output_dir: Path
    seed: int
    stage: Stage | None = None
    seen: list[Stage] = field(default_factory=list)
    make_loader: Callable[..., Any] | None = None  # (samples, mode="train"|"eval", batch_size) -> iterable of batches
    #: (groups, modality) -> parameter names of the recipe's trainable groups (``llm``,
    #: ``connector``, ...) resolved for ``modality``; set by the engine
    resolve_groups: Callable[[Any, str | None], set[str]] | None = None
    #: (manifest, root=None, limit=None) -> samples of a LLaVA-JSON file (relative paths: under
    #: ``data.root``); set by the engine
    load_samples: Callable[..., list] | None = None
    #: ``train.precision`` of the recipe (``fp32`` | ``bf16`` | ``fp16``): see :meth:`forward`
    precision: str = "fp32"
    #: the dispatcher's ``before_forward`` (every method's routing); set by the engine
    before_forward: Callable[[dict], None] | None = None
    #: under ``mil federate``: ``{"client", "task", "round", "rounds"}`` of the client whose data
    #: trains or is scored now (``task``: its task key, see mil_plugins.client_split); else None
    federation: dict | None = None
    #: a :class:`~mil_plugins.methods.teacher.TeacherSource` while a stage trains, when a method
    #: declares ``uses_teacher`` (or a zero-argument callable building the teacher)
    _teacher: Any = None

    def teacher(self):
        """The model as it was before the current stage, frozen, in eval mode (built on first use;
        frozen parameters are shared with ``model``). Only for methods with ``uses_teacher = True``."""
        if self._teacher is None:
            raise RuntimeError("teacher() is only available while a stage is being trained, to a "
                               "method that declares uses_teacher = True")
        if hasattr(self._teacher, "get"):
            return self._teacher.get()
        if callable(self._teacher) and not isinstance(self._teacher, torch.nn.Module):
            self._teacher = self._teacher()
        return self._teacher

    def forward(self, batch: dict, model: Any = None):
        """``model(batch)`` (default: the student) on the training forward path: every method's
        ``before_forward`` first, then autocast as ``train.precision`` says. For the extra forwards
        a method runs (a Fisher pass, distillation prompts)."""
        if self.before_forward is not None:
            self.before_forward(batch)
        model = self.model if model is None else model
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is None:
            return model(batch)
        device = next(model.parameters()).device
        with torch.autocast(device.type, dtype=dtype):
            return model(batch)

    def generator(self, *salt: Any) -> torch.Generator:
        """A seeded torch.Generator for (seed, stage, salt...): repeatable randomness for methods."""
        key = repr((self.seed, self.stage.index if self.stage else -1, *salt)).encode()
        g = torch.Generator()
        g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % (2**63))
        return g


def lazy_frozen_copy(model: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    """Take the weights now; build the frozen module only if a method asks for it."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def build() -> torch.nn.Module:
        twin = copy.deepcopy(model)
        twin.load_state_dict(state)
        twin.eval()
        for p in twin.parameters():
            p.requires_grad_(False)
        return twin

    return build

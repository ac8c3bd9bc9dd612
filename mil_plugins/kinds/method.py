"""The continual-method hook interface.

A method is a :class:`Method` subclass published in the ``mil_plugins.methods`` entry-point group.
Every hook has a no-op default; the engine calls the hooks of every method in the recipe, in order.
Hooks *return* what they change (sample lists, trainable-name sets, loss terms, optimiser groups);
the only thing a method mutates is the model it was handed in :meth:`setup` (to add adapters,
gates, experts: as submodules, or beside the LLM's / connector's linear layers through
``ctx.model.wrap_linears``) and its own state. Parameters and persistent buffers a method adds to
the model are checkpointed with it. The engine calls the hooks through one
:class:`~mil_plugins.methods.dispatch.MethodHooks`. Misspelled hooks are caught when the class is
registered (see :func:`check_method_plugin`).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mil_plugins.registry import merge_options

if TYPE_CHECKING:  # pragma: no cover
    from mil_plugins.kinds.context import MethodContext, Stage


HOOKS = (
    "setup",            # (ctx) once, after the model is built: add modules to ctx.model
    "before_stage",     # (ctx, stage) before a stage's data and optimiser are built
    "train_samples",    # (ctx, stage, samples) -> samples the stage trains on (replay, joint, pseudo targets)
    "trainable",        # (ctx, stage, names) -> set of parameter names to train this stage
    "before_forward",   # (ctx, batch) before every forward, training and evaluation (routing)
    "loss_terms",       # (ctx, batch, outputs) -> {name: scalar tensor} added to the LM loss
    "param_groups",     # (ctx, stage) -> [{"names", "lr" | "lr_scale", "weight_decay"}] own optimiser groups
    "after_step",       # (ctx, stage, step) after each optimiser step
    "after_epoch",      # (ctx, stage, epoch) after the last step of each epoch (0-based; a stage
                        # cut short by max_steps: also after its last step), before any checkpoint
    "after_stage",      # (ctx, stage) after a stage's training, before its checkpoint
    "state_dict",       # () -> dict saved with every checkpoint
    "load_state_dict",  # (state) restores it on --resume
)


class Method:
    """Base class of a continual-learning method. Override only the hooks you need."""

    name: ClassVar[str] = ""
    #: options and their defaults; the recipe may set only these keys
    default_options: ClassVar[dict[str, Any]] = {}
    #: other method names this one cannot be combined with, and why
    conflicts: ClassVar[dict[str, str]] = {}
    #: True if the method calls ``ctx.teacher()``: only then does the engine keep a teacher
    uses_teacher: ClassVar[bool] = False

    def __init__(self, **options: Any):
        self.options: dict[str, Any] = merge_options("method", self.name, self.default_options,
                                                     options)

    # ---- hooks (no-op defaults) ----------------------------------------------------------------
    def setup(self, ctx: "MethodContext") -> None:
        return None

    def before_stage(self, ctx: "MethodContext", stage: "Stage") -> None:
        return None

    def train_samples(self, ctx: "MethodContext", stage: "Stage", samples: list) -> list:
        return samples

    def trainable(self, ctx: "MethodContext", stage: "Stage", names: set[str]) -> set[str]:
        return names

    def before_forward(self, ctx: "MethodContext", batch: dict) -> None:
        return None

    def loss_terms(self, ctx: "MethodContext", batch: dict, outputs: Any) -> dict[str, torch.Tensor]:
        return {}

    def param_groups(self, ctx: "MethodContext", stage: "Stage") -> list[dict[str, Any]]:
        """Optimiser groups of this method's own: ``[{"names": [param names], "lr": float}]``
        (or ``"lr_scale"``: a factor on the stage's lr; optional ``"weight_decay"``). Only the
        trainable ones are used; the rest stay in the engine's groups."""
        return []

    def after_step(self, ctx: "MethodContext", stage: "Stage", step: int) -> None:
        return None

    def after_epoch(self, ctx: "MethodContext", stage: "Stage", epoch: int) -> None:
        return None

    def after_stage(self, ctx: "MethodContext", stage: "Stage") -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def check_method_plugin(name: str, obj: Any) -> None:
    """Registry check: a Method subclass whose public callables are all known hooks."""
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise TypeError(f"expected a subclass of mil_plugins.methods.base.Method, got {obj!r}")
    if obj.name != name:
        raise TypeError(f"{obj.__name__}.name is {obj.name!r} but it is registered as {name!r}")
    base_attrs = set(dir(Method))
    for attr, value in vars(obj).items():
        if attr.startswith("_") or attr in base_attrs or not callable(value):
            continue
        if isinstance(value, (staticmethod, classmethod, type)):
            continue
        close = difflib.get_close_matches(attr, HOOKS, n=1, cutoff=0.85)
        if close:
            raise TypeError(f"{obj.__name__}.{attr} looks like the hook {close[0]!r} misspelled")


def check_composition(methods: list[Method]) -> None:
    """Reject method combinations that cannot work, with the reason."""
    names = [m.name for m in methods]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"method(s) listed twice: {sorted(dupes)}")
    for m in methods:
        for other, why in m.conflicts.items():
            if other in names:
                raise ValueError(f"methods {m.name!r} and {other!r} cannot be combined: {why}")

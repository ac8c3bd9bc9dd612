"""A stage checkpoint rebuilt for scoring (``mil eval``) or export (``mil export``): the one place
that reads a checkpoint back into a model, below evaluation and export, which both call
:func:`load_for_eval`. (Adopting another project's checkpoint, an HF Llava or a LLaVA-original
directory, is a reader in :mod:`mil_plugins.integrations`, which a recipe's ``model.llm.llava``
reaches through :class:`~mil_plugins.engine.session.Session`.)"""

from __future__ import annotations

from pathlib import Path

from mil_plugins.engine import checkpoint as ckpt
from mil_plugins.engine.distributed import Dist
from mil_plugins.engine.session import Session


class EvalSession:
    """A stage checkpoint rebuilt for scoring (``mil eval``) or export."""

    def __init__(self, checkpoint: Path):
        loaded = ckpt.read_checkpoint(checkpoint)
        self.recipe = loaded["recipe"]
        self.dist = Dist()
        self.session = Session(self.recipe, self.dist, tokenizer_dir=loaded["tokenizer_dir"],
                               load_data=False)
        self.session.restore(loaded)
        self.model, self.methods, self.ctx = self.session.model, self.session.methods, self.session.ctx
        self.model.eval()
        self.make_loader = self.session.make_loader
        self.state = loaded["state"]

    def load_samples(self, manifest: Path, root: Path | None = None) -> list:
        return self.session.load_samples(manifest, root)

    def answer_options(self, samples: list, choices: str | None = "recipe") -> list | None:
        """As :meth:`Session.answer_options`, with ``choices`` (``"task"``, ``"sample"`` or None)
        in place of the checkpoint recipe's ``eval.choices`` unless it is ``"recipe"``."""
        if choices == "recipe":
            return self.session.answer_options(samples)
        ev = self.session.recipe["eval"]
        saved, ev["choices"] = ev.get("choices"), choices
        try:
            return self.session.answer_options(samples)
        finally:
            ev["choices"] = saved


def load_for_eval(checkpoint: Path) -> EvalSession:
    return EvalSession(Path(checkpoint))

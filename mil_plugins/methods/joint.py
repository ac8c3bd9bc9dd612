"""``joint``: train on every stage's data (the upper bound of a continual run).

Standard (non-continual) baseline. Hook: ``train_samples`` -- the stage's own samples plus the
training samples of other stages:

``mode: cumulative`` (default)
    stage ``i`` trains on stages ``0..i`` (the union of everything seen so far, the usual
    "joint / multitask up to now" upper bound; the accuracy matrix stays lower-triangular).
``mode: all``
    every stage trains on the data of *all* stages, future ones included (one multitask model,
    repeated once per stage; useful to read the ceiling off the first row).

The samples come from ``ctx.stages[k].train_samples`` (the engine loads every stage's data up
front); the training loop shuffles them, so batches mix modalities. Hook ``trainable``: the
per-modality parts (input layer / projector, encoder if trained) of every modality in the data
train too, not only the stage's own.
"""

from __future__ import annotations

from mil_plugins.methods._common import modality_parameters
from mil_plugins.methods.base import Method

MODES = ("cumulative", "all")


class Joint(Method):
    name = "joint"
    default_options = {"mode": "cumulative"}
    conflicts = {
        "replay": "joint already trains on every stage's data (a replay buffer adds nothing)",
        "expansion": "expansion freezes each earlier stage's adapter and routes that modality to "
                     "it, so joint's earlier-stage samples would train nothing",
    }

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["mode"] not in MODES:
            raise ValueError(f"method 'joint': mode must be one of {MODES}, "
                             f"got {self.options['mode']!r}")

    def train_samples(self, ctx, stage, samples):
        if self.options["mode"] == "all":
            others = [st for st in ctx.stages if st.index != stage.index]
        else:
            others = [st for st in ctx.stages if st.index < stage.index]
        extra = [s for st in others for s in st.train_samples]
        return list(samples) + extra

    def trainable(self, ctx, stage, names):
        # every modality trained on gets its own parts trained too (input layer / projector)
        return names | modality_parameters(ctx, stage, self.train_samples(ctx, stage, []))

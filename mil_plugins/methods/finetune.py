"""``finetune``: plain sequential training, stage after stage (the lower bound).

Every hook is the base class's no-op: each stage trains the recipe's trainable groups on its own
data only, so whatever is shared across stages is free to drift (and forget).
"""

from __future__ import annotations

from mil_plugins.methods.base import Method


class Finetune(Method):
    name = "finetune"

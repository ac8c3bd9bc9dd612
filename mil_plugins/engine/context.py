"""Moved to :mod:`mil_plugins.methods.context` (the method-facing types live beside the methods);
kept so that existing imports keep working."""

from mil_plugins.methods.context import MethodContext, Stage, lazy_frozen_copy

__all__ = ["MethodContext", "Stage", "lazy_frozen_copy"]

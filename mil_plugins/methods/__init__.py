"""Continual-learning methods: the hook interface (``base``) and the built-in methods."""

from mil_plugins.methods.base import HOOKS, Method, check_composition, check_method_plugin

__all__ = ["HOOKS", "Method", "check_composition", "check_method_plugin"]

"""Recipes: YAML in sections, validated against ``schema`` before anything is built."""

from mil_plugins.recipe.load import RecipeError, apply_overrides, deep_merge, load_recipe

__all__ = ["RecipeError", "apply_overrides", "deep_merge", "load_recipe"]

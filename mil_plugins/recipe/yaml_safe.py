"""YAML for recipes: the safe loader, plus two refusals PyYAML does not make.

* A key given twice in one mapping is an error (PyYAML silently keeps the last one).
* Aliases are limited: at most :data:`MAX_ALIASES` ``*alias`` uses per document, and the document,
  with every alias expanded, at most :data:`MAX_NODES` values (a "billion laughs" recipe passes
  PyYAML, shares its objects, and exhausts memory only later when something copies or writes it).

JSON is YAML, so a JSON recipe gets the same checks.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_ALIASES = 100
MAX_NODES = 100_000


class RecipeYAMLError(ValueError):
    """The text is not a recipe YAML may hold; the message says where."""


class _Loader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise RecipeYAMLError(f"line {mark.line + 1}: more than {MAX_ALIASES} YAML "
                                      f"aliases (*name); write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if first is not None:
                    raise RecipeYAMLError(
                        f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first at "
                        f"line {first.start_mark.line + 1}); a key may appear once per mapping")
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _count(value: Any, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise RecipeYAMLError(f"the recipe expands to more than {MAX_NODES} values (nested "
                              f"aliases?); write it out plainly")
    if isinstance(value, dict):
        for k, v in value.items():
            _count(k, budget)
            _count(v, budget)
    elif isinstance(value, list):
        for v in value:
            _count(v, budget)


def load_yaml(text: str) -> Any:
    """Parse ``text`` like ``yaml.safe_load``, refusing duplicate keys and alias bombs."""
    data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    _count(data, [MAX_NODES])
    return data

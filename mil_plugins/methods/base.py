"""The continual-method hook interface: :class:`Method`, :data:`HOOKS` and their checks, defined in
:mod:`mil_plugins.kinds.method` (the kinds' floor, below the registry) and importable from here,
where methods have always imported them."""

from mil_plugins.kinds.method import HOOKS, Method, check_composition, check_method_plugin  # noqa: F401

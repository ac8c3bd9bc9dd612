"""What the engine hands a method: :class:`Stage`, :class:`MethodContext` and
:func:`lazy_frozen_copy`, defined in :mod:`mil_plugins.kinds.context` (the kinds' floor) and
importable from here."""

from mil_plugins.kinds.context import MethodContext, Stage, lazy_frozen_copy  # noqa: F401

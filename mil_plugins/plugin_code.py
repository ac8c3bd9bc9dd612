"""The code identity of a plugin class: a hash of the source it runs.

:func:`code_fingerprint` hashes the source file of the module that defines a class and of every
module that module imports from its own top-level package, followed transitively (so
``encoders.image`` covers ``encoders._towers``, ``encoders._timm_tower``, ``encoders._common``
...; a third-party plugin ``mil_thermal.plugin`` covers the rest of ``mil_thermal``). The toolkit (``mil_plugins``) and
other distributions are not part of it unless the plugin lives in them. Imports are found by
reading the source (``ast``), not by running it.

The feature cache puts this hash in its key (:meth:`mil_plugins.modality.ModalityPlugin.fingerprint`),
so editing a plugin's ``preprocess`` or its encoder's code never serves features computed by the
old code. It is computed once per class object: a module reloaded after an edit defines a new class
and gets a new hash.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import sys
import weakref
from pathlib import Path

__all__ = ["code_fingerprint", "package_sources"]

_MEMO: "weakref.WeakKeyDictionary[type, str]" = weakref.WeakKeyDictionary()


def _module_file(name: str) -> Path | None:
    mod = sys.modules.get(name)
    file = getattr(mod, "__file__", None) if mod is not None else None
    if file is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        file = spec.origin if spec is not None and spec.has_location else None
    if file is None or not str(file).endswith(".py"):
        return None
    return Path(file)


def _is_package(file: Path) -> bool:
    return file.name == "__init__.py"


def _imported_names(name: str, file: Path, source: str) -> set[str]:
    """Absolute names of the modules ``source`` (module ``name``) imports, as far as ``ast`` sees."""
    package = name if _is_package(file) else name.rpartition(".")[0]
    out: set[str] = set()
    try:
        tree = ast.parse(source, filename=str(file))
    except SyntaxError:
        return out
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            try:
                absolute = importlib.util.resolve_name(base, package) if node.level else base
            except (ImportError, ValueError):
                continue
            out.add(absolute)
            out.update(f"{absolute}.{alias.name}" for alias in node.names)  # submodules
    return out


def package_sources(module_name: str) -> dict[str, str]:
    """``{module name: source}`` of ``module_name`` and every module of its top-level package it
    imports, transitively (modules without a ``.py`` file are left out)."""
    top = module_name.split(".")[0]
    seen: dict[str, str] = {}
    todo = [module_name]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        file = _module_file(name)
        if file is None:
            continue
        try:
            source = file.read_text(encoding="utf-8")
        except OSError:
            continue
        seen[name] = source
        todo.extend(n for n in _imported_names(name, file, source)
                    if n.split(".")[0] == top and n not in seen)
    return seen


def code_fingerprint(cls: type) -> str:
    """sha256 (hex, 16 characters) of the source of ``cls``'s module and of the modules of its own
    package that it imports (see the module docstring). A class whose module has no source file
    (defined in ``__main__`` of an interactive session, say) is hashed by its own source when
    ``inspect`` can find it, else by its qualified name alone."""
    if cls in _MEMO:
        return _MEMO[cls]
    h = hashlib.sha256()
    sources = package_sources(cls.__module__)
    if not sources:
        try:
            sources = {cls.__qualname__: inspect.getsource(cls)}
        except (OSError, TypeError):
            sources = {cls.__qualname__: ""}
    for name in sorted(sources):
        h.update(f"\0{name}\0".encode())
        h.update(sources[name].encode("utf-8"))
    digest = h.hexdigest()[:16]
    _MEMO[cls] = digest
    return digest

"""One small registry class that serves every plugin kind (modality, projector, method).

Plugins come from Python entry points (``mil_plugins.<kind>s`` groups) -- our own built-ins are
declared the same way in ``pyproject.toml`` -- or from :meth:`Registry.register` (tests, notebooks).
Discovery imports nothing; a plugin is imported the first time it is asked for. A plugin that fails
to import, has the wrong type, or reuses a name already taken is recorded as *failed* with its
distribution, version, entry point and cause (any exception, ``SystemExit`` included: only
``KeyboardInterrupt`` passes): the others keep working, and asking for the broken
one by name raises :class:`PluginError` saying all of that.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable


def merge_options(kind: str, name: str, defaults: dict[str, Any], options: dict[str, Any]) -> dict:
    """``defaults`` updated with ``options``; an unknown option is an error that lists the valid ones
    (modality plugins and methods take their recipe options this way)."""
    unknown = set(options) - set(defaults)
    if unknown:
        raise ValueError(f"{kind} {name!r}: unknown option(s) {sorted(unknown)}; "
                         f"valid: {sorted(defaults) or '(none)'}")
    return {**defaults, **options}


class PluginError(LookupError):
    """A plugin is unknown, or could not be loaded; the message says which and why."""


@dataclass
class PluginRecord:
    kind: str
    name: str
    distribution: str
    version: str
    entry_point: str  # "module:attr" (or "<registered>" for in-process registration)
    _obj: Any = None
    _loader: Callable[[], Any] | None = None
    error: str | None = None
    loaded: bool = False

    @property
    def status(self) -> str:
        if self.error:
            return "failed"
        return "loaded" if self.loaded else "not loaded"

    def origin(self) -> str:
        return f"{self.distribution} {self.version} (entry point {self.name} = {self.entry_point})"

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "entry_point": self.entry_point,
            "status": self.status,
            "error": self.error,
        }


@dataclass
class Registry:
    """Plugins of one kind, by name.

    ``check(name, obj)`` validates a loaded object and raises ``TypeError`` with a reason when the
    object is not a valid plugin of this kind.
    """

    kind: str
    group: str
    check: Callable[[str, Any], None] | None = None
    _records: dict[str, PluginRecord] = field(default_factory=dict)
    _failed: list[PluginRecord] = field(default_factory=list)
    _discovered: bool = False

    # ---- filling -------------------------------------------------------------------------------
    def register(self, name: str, obj: Any = None, *, distribution: str = "<in-process>",
                 version: str = "", replace: bool = False):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""
        if obj is None:
            return lambda o: (self.register(name, o, distribution=distribution, version=version,
                                            replace=replace), o)[1]
        self._ensure_discovered()
        if name in self._records and not replace:
            raise PluginError(
                f"duplicate {self.kind} name {name!r}: already provided by "
                f"{self._records[name].origin()}")
        record = PluginRecord(self.kind, name, distribution, version, "<registered>", _obj=obj)
        self._validate(record, obj)
        if record.error:
            raise PluginError(f"{self.kind} plugin {name!r}: {record.error}")
        record.loaded = True
        self._records[name] = record
        return obj

    def unregister(self, name: str) -> None:
        self._records.pop(name, None)

    def discover(self, entry_points: Iterable[metadata.EntryPoint] | None = None) -> None:
        """Collect entry points of this registry's group (without importing them).

        ``entry_points`` lets tests pass fake ones; by default the installed distributions' are read.
        """
        self._discovered = True
        if entry_points is None:
            entry_points = metadata.entry_points(group=self.group)
        for ep in entry_points:
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "<unknown distribution>"
            version = dist.version if dist is not None else ""
            record = PluginRecord(self.kind, ep.name, dist_name, version, ep.value,
                                  _loader=ep.load)
            if ep.name in self._records:
                first = self._records[ep.name]
                if (first.distribution, first.entry_point) == (dist_name, ep.value):
                    continue  # the same distribution seen twice on sys.path: not a conflict
                record.error = (f"duplicate {self.kind} name {ep.name!r}: also provided by "
                                f"{first.origin()}")
                first.error = first.error or (
                    f"duplicate {self.kind} name {ep.name!r}: also provided by {record.origin()}")
                self._failed.append(record)
                continue
            self._records[ep.name] = record

    def _ensure_discovered(self) -> None:
        if not self._discovered:
            self.discover()

    # ---- reading -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self._ensure_discovered()
        return sorted(self._records)

    def __contains__(self, name: str) -> bool:
        self._ensure_discovered()
        return name in self._records

    def get(self, name: str) -> Any:
        """The plugin object named ``name``; raises :class:`PluginError` if unknown or broken."""
        self._ensure_discovered()
        record = self._records.get(name)
        if record is None:
            raise PluginError(self.unknown_message(name))
        self._load(record)
        if record.error:
            raise PluginError(f"{self.kind} plugin {name!r} from {record.origin()} failed to load: "
                              f"{record.error}")
        return record._obj

    def unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} Registered: {', '.join(names) or '(none)'}"

    def records(self, load: bool = True) -> list[PluginRecord]:
        """Every record of this kind (working and failed), loading each when ``load`` is true."""
        self._ensure_discovered()
        records = list(self._records.values()) + list(self._failed)
        if load:
            for record in records:
                self._load(record)
        return sorted(records, key=lambda r: (r.name, r.distribution))

    # ---- internals -----------------------------------------------------------------------------
    def _load(self, record: PluginRecord) -> None:
        if record.loaded or record.error or record._loader is None:
            return
        try:
            obj = record._loader()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # any import-time failure, SystemExit included
            record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, SystemExit):
                record.error = f"the plugin called sys.exit({exc.code!r}) while being imported"
            return
        self._validate(record, obj)
        if not record.error:
            record._obj = obj
            record.loaded = True

    def _validate(self, record: PluginRecord, obj: Any) -> None:
        if self.check is None:
            return
        try:
            self.check(record.name, obj)
        except TypeError as exc:
            record.error = f"wrong type: {exc}"
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # e.g. a class property that raises while being checked
            record.error = f"cannot be checked: {type(exc).__name__}: {exc}"

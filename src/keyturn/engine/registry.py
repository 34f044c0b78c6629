"""The installed plugins: credential kinds, deploy targets and probes, found through entry points
(``keyturn.kinds``, ``keyturn.targets``, ``keyturn.probes``). The built-in ones register the same
way, in keyturn's own package metadata. Generic code asks the registry; it never names a kind.

An entry point is loaded when its plugin is first asked for, not when the registry is built: a
command whose config names a `file` target does not import the AWS or Vault adapters."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from keyturn.domain.errors import ConfigError, KeyturnError

if TYPE_CHECKING:
    # The SPI (pydantic) and the plugins load with the registry, not with this module: a
    # command that never asks for a plugin (`keyturn --help`) does not pay for them.
    from importlib.metadata import EntryPoint

    from keyturn.domain.model import ActionRecord, Phase, Rotation
    from keyturn.engine.spi import KindPlugin, ProbePlugin, TargetPlugin

P = TypeVar("P")


@dataclass(frozen=True)
class Installed:
    group: str
    name: str
    source: str  # "module:attribute" of the entry point
    distribution: str
    description: str


class EntryPoints(MutableMapping[str, P]):
    """The plugins of one entry-point group by name, each loaded at its first lookup (and
    checked to call itself by its entry point's name)."""

    def __init__(self, group: str, attr: str) -> None:
        self.group = group
        self._attr = attr
        self._points: dict[str, EntryPoint] = {
            ep.name: ep for ep in sorted(_entry_points(group), key=lambda e: e.name)
        }
        self._loaded: dict[str, P] = {}

    def __getitem__(self, name: str) -> P:
        if name not in self._loaded:
            self._loaded[name] = _load(self.group, self._attr, self._points[name])
        return self._loaded[name]

    def __setitem__(self, name: str, plugin: P) -> None:
        self._loaded[name] = plugin

    def __delitem__(self, name: str) -> None:
        self._points.pop(name, None)
        del self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._points or name in self._loaded  # without loading it

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({*self._points, *self._loaded}))

    def __len__(self) -> int:
        return len({*self._points, *self._loaded})

    def installed(self) -> list[Installed]:
        """Every plugin of the group (all loaded), as `keyturn plugins` lists them."""
        found = []
        for name, ep in self._points.items():
            plugin = self[name]
            dist = ep.dist.name if ep.dist is not None else "?"
            description = str(getattr(plugin, "description", ""))
            found.append(Installed(self.group, name, ep.value, dist, description))
        return found


@dataclass
class Registry:
    kinds: MutableMapping[str, KindPlugin] = field(default_factory=dict)
    targets: MutableMapping[str, TargetPlugin] = field(default_factory=dict)
    probes: MutableMapping[str, ProbePlugin] = field(default_factory=dict)

    @property
    def installed(self) -> list[Installed]:
        """The plugins installed through entry points (none in a registry made by :meth:`of`)."""
        found: list[Installed] = []
        for table in (self.kinds, self.targets, self.probes):
            if isinstance(table, EntryPoints):
                found.extend(table.installed())
        return found

    @classmethod
    def of(
        cls,
        kinds: Iterable[KindPlugin] = (),
        targets: Iterable[TargetPlugin] = (),
        probes: Iterable[ProbePlugin] = (),
    ) -> Registry:
        """A registry of these plugins (tests; a program embedding keyturn)."""
        reg = cls()
        for k in kinds:
            reg.kinds[k.name] = k
        for t in targets:
            reg.targets[t.type] = t
        for p in probes:
            reg.probes[p.type] = p
        return reg

    def kind(self, name: str) -> KindPlugin:
        try:
            return self.kinds[name]
        except KeyError:
            raise KeyturnError(
                f"credential kind {name!r} is not installed; installed kinds: "
                f"{_names(self.kinds)} (see `keyturn plugins`)"
            ) from None

    def target(self, type_: str) -> TargetPlugin:
        try:
            return self.targets[type_]
        except KeyError:
            raise ConfigError(
                f"deploy target type {type_!r} is not installed; installed: "
                f"{_names(self.targets)} (see `keyturn plugins`)"
            ) from None

    def probe(self, type_: str) -> ProbePlugin:
        try:
            return self.probes[type_]
        except KeyError:
            raise ConfigError(
                f"probe type {type_!r} is not installed; installed: {_names(self.probes)} "
                "(see `keyturn plugins`)"
            ) from None

    def irreversible_reason(
        self, rotation: Rotation, actions: Iterable[ActionRecord]
    ) -> str | None:
        """Why rollback is no longer possible: the first recorded intent of an action its kind
        declares irreversible, in the kind's words; None when it is still possible."""
        kind = self.kind(rotation.kind)
        declared: set[tuple[Phase, str]] = {
            (a.phase, a.name)
            for step in kind.steps.values()
            for a in step.actions
            if a.irreversible
        }
        for a in actions:
            # an action run once per target is recorded as <declared name>@<target>
            if (a.phase, a.name.split("@", 1)[0]) in declared:
                reason = (
                    f"it is irreversible from action {a.name} on (intent recorded "
                    f"{a.intent_at.isoformat(timespec='seconds')})"
                )
                words = kind.irreversible_words()
                return f"{reason}: {words}" if words else reason
        return None


def _names(plugins: Mapping[str, Any]) -> str:
    return ", ".join(sorted(plugins)) or "none"


def _load(group: str, attr: str, ep: EntryPoint) -> Any:
    try:
        plugin = ep.load()
    except Exception as exc:  # a broken plugin must not take keyturn down; say which
        raise KeyturnError(
            f"plugin {ep.name} ({ep.value}, group {group}) failed to load: "
            f"{type(exc).__name__}: {exc}; reinstall or uninstall it"
        ) from None
    key = str(getattr(plugin, attr, ""))
    if key != ep.name:
        raise KeyturnError(
            f"plugin {ep.value} is registered as {ep.name!r} in {group} but calls itself "
            f"{key!r}; make the entry point's name match"
        )
    return plugin


@cache
def _entry_points(group: str) -> tuple[EntryPoint, ...]:
    """The installed entry points of `group`, from one read of every distribution's metadata
    per process (a read per group would scan them all again: a fifth of a read command)."""
    return tuple(_installed_entry_points().select(group=group))


@cache
def _installed_entry_points() -> Any:  # EntryPoints, or SelectableGroups on Python 3.11
    from importlib.metadata import entry_points

    return entry_points()


@cache
def discovered() -> Registry:
    """Every installed plugin, each loaded at its first use, once per process."""
    from keyturn.engine.spi import KIND_GROUP, PROBE_GROUP, TARGET_GROUP

    return Registry(
        kinds=EntryPoints(KIND_GROUP, "name"),
        targets=EntryPoints(TARGET_GROUP, "type"),
        probes=EntryPoints(PROBE_GROUP, "type"),
    )

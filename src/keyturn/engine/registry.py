"""The installed plugins: credential kinds, deploy targets and probes, found through entry points
(``keyturn.kinds``, ``keyturn.targets``, ``keyturn.probes``). The built-in ones register the same
way, in keyturn's own package metadata. Generic code asks the registry; it never names a kind."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from keyturn.domain.errors import ConfigError, KeyturnError
from keyturn.domain.model import ActionRecord, Phase, Rotation
from keyturn.engine.spi import (
    KIND_GROUP,
    PROBE_GROUP,
    TARGET_GROUP,
    KindPlugin,
    ProbePlugin,
    TargetPlugin,
)


@dataclass(frozen=True)
class Installed:
    group: str
    name: str
    source: str  # "module:attribute" of the entry point
    distribution: str
    description: str


@dataclass
class Registry:
    kinds: dict[str, KindPlugin] = field(default_factory=dict)
    targets: dict[str, TargetPlugin] = field(default_factory=dict)
    probes: dict[str, ProbePlugin] = field(default_factory=dict)
    installed: list[Installed] = field(default_factory=list)

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


def _load(group: str) -> list[tuple[Installed, Any]]:
    found = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take keyturn down; say which
            raise KeyturnError(
                f"plugin {ep.name} ({ep.value}, group {group}) failed to load: "
                f"{type(exc).__name__}: {exc}; reinstall or uninstall it"
            ) from None
        dist = ep.dist.name if ep.dist is not None else "?"
        info = Installed(group, ep.name, ep.value, dist, str(getattr(plugin, "description", "")))
        found.append((info, plugin))
    return found


@cache
def discovered() -> Registry:
    """Every installed plugin, loaded once per process."""
    reg = Registry()
    for group, table, attr in (
        (KIND_GROUP, reg.kinds, "name"),
        (TARGET_GROUP, reg.targets, "type"),
        (PROBE_GROUP, reg.probes, "type"),
    ):
        for info, plugin in _load(group):
            key = str(getattr(plugin, attr, ""))
            if key != info.name:
                raise KeyturnError(
                    f"plugin {info.source} is registered as {info.name!r} in {group} but calls "
                    f"itself {key!r}; make the entry point's name match"
                )
            table[key] = plugin
            reg.installed.append(info)
    return reg

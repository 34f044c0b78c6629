"""TOML configuration, validated into typed models. Errors name the file, the key and the fix."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from keyturn.domain.errors import ConfigError, KeyturnError
from keyturn.engine.registry import Registry, discovered
from keyturn.engine.spi import (
    CredentialConfig,
    KindPlugin,
    PluginModel,
    ProbePlugin,
    TargetPlugin,
)

DEFAULT_CONFIG_NAME = "keyturn.toml"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Model):
    #: SQLite (default, a file in the working directory) or postgresql+psycopg://...
    url: str = "sqlite:///keyturn.db"

    @field_validator("url")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        if not (v.startswith("sqlite:///") or v.startswith("postgresql+psycopg://")):
            raise ValueError("expected a sqlite:///PATH or postgresql+psycopg://... URL")
        return v


class KeysConfig(_Model):
    #: File holding the master key (mode 0600); KEYTURN_MASTER_KEY overrides it.
    master_key_file: Path | None = None
    #: Older master keys still accepted for reading (during `keys rotate-master`).
    previous_master_key_files: list[Path] = Field(default_factory=list)
    #: Days an old private key is kept (encrypted) after its rotation ends, for rollback.
    retention_days: float = Field(default=30.0, ge=0)


class WorkerConfig(_Model):
    lease_seconds: float = Field(default=30.0, gt=1)
    concurrency: int = Field(default=8, ge=1, le=1000)
    poll_seconds: float = Field(default=1.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    backoff_base_seconds: float = Field(default=1.0, gt=0)
    backoff_max_seconds: float = Field(default=60.0, gt=0)


class ProviderConfig(_Model):
    base_url: str
    timeout_seconds: float = Field(default=10.0, gt=0)
    #: The installation's request budget for this provider, shared by every worker process
    #: (and command) using the same database (Dfns: 1000 requests per minute per organisation;
    #: set the same value everywhere). Unset: no client-side limit.
    requests_per_minute: float | None = Field(default=None, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/")


class LoggingConfig(_Model):
    format: Literal["auto", "console", "json"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Model):
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    keys: KeysConfig = Field(default_factory=KeysConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    #: Each table validated by its kind's model (see :func:`load_config`).
    credentials: dict[str, CredentialConfig] = Field(default_factory=dict)
    #: Where the file was read from (paths in it are relative to its directory).
    source: Path | None = None

    def credential(self, name: str) -> CredentialConfig:
        try:
            return self.credentials[name]
        except KeyError:
            where = self.source or "the configuration"
            raise ConfigError(
                f"{where}: no [credentials.{name}] section; add one with its kind, provider and "
                "targets"
            ) from None

    def provider(self, name: str) -> ProviderConfig:
        try:
            return self.providers[name]
        except KeyError:
            where = self.source or "the configuration"
            raise ConfigError(
                f"{where}: no [providers.{name}] section; add one with its base_url"
            ) from None


def _resolve(base: Path, p: Path) -> Path:
    return p if p.is_absolute() else (base / p)


def _absolutise(raw: dict[str, object], base: Path) -> None:
    """Make relative paths (and a relative SQLite URL) relative to the config file's directory."""
    db = raw.get("database")
    if isinstance(db, dict):
        url = db.get("url")
        if (
            isinstance(url, str)
            and url.startswith("sqlite:///")
            and not url.startswith("sqlite:////")
        ):
            rel = url[len("sqlite:///") :]
            if rel and not rel.startswith(":memory:"):
                db["url"] = f"sqlite:///{(base / rel).resolve()}"
    keys = raw.get("keys")
    if isinstance(keys, dict):
        if isinstance(keys.get("master_key_file"), str):
            keys["master_key_file"] = str(_resolve(base, Path(keys["master_key_file"])))
        prev = keys.get("previous_master_key_files")
        if isinstance(prev, list):
            keys["previous_master_key_files"] = [
                str(_resolve(base, Path(p))) if isinstance(p, str) else p for p in prev
            ]


def _read(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass --config FILE or run `keyturn init`"
        )
    try:
        raw: dict[str, object] = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc}); fix the syntax") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from None
    _absolutise(raw, path.resolve().parent)
    raw["source"] = str(path)
    return raw


def load_config(path: Path | None, registry: Registry | None = None) -> Config:
    """Read and validate a config file; with no path, KEYTURN_CONFIG, then ./keyturn.toml, then
    defaults. KEYTURN_DATABASE_URL overrides database.url."""
    if path is None and os.environ.get("KEYTURN_CONFIG"):
        path = Path(os.environ["KEYTURN_CONFIG"])
    if path is None and Path(DEFAULT_CONFIG_NAME).is_file():
        path = Path(DEFAULT_CONFIG_NAME)
    raw = _read(path) if path is not None else {}
    env_url = os.environ.get("KEYTURN_DATABASE_URL")
    if env_url:
        db = raw.setdefault("database", {})
        if isinstance(db, dict):
            db["url"] = env_url
    registry = registry or discovered()
    where = path if path is not None else "the configuration"
    base = path.resolve().parent if path is not None else Path.cwd()
    tables = raw.pop("credentials", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"config file {where}: key credentials: expected a table of tables")
    credentials = {
        name: _credential(where, base, registry, str(name), table) for name, table in tables.items()
    }
    try:
        config = Config.model_validate({**raw, "credentials": credentials})
    except ValidationError as exc:
        raise ConfigError(_first_error(where, exc)) from None
    signers = frozenset(
        name for name, c in credentials.items() if registry.kind(c.kind).signs_requests
    )
    for name, cred in credentials.items():
        problem = registry.kind(cred.kind).check_config(name, cred, signers)
        if problem:
            raise ConfigError(f"config file {where}: {problem}")
        if cred.provider not in config.providers:
            raise ConfigError(
                f"config file {where}: key credentials.{name}.provider: no provider named "
                f"{cred.provider!r}; define [providers.{cred.provider}]"
            )
    return config


def _first_error(where: object, exc: ValidationError, prefix: str = "") -> str:
    first = exc.errors()[0]
    key = ".".join(str(p) for p in (*([prefix] if prefix else []), *first["loc"]))
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key; check its spelling against config/keyturn.example.toml"
    return f"config file {where}: key {key}: {msg}{more}"


def _credential(
    where: object, base: Path, registry: Registry, name: str, table: object
) -> CredentialConfig:
    """One ``[credentials.NAME]`` table, validated by its kind's model; its targets and probes
    by their types' models (each must take the kind's material)."""
    key = f"credentials.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"config file {where}: key {key}: expected a table")
    table = dict(table)
    kind_name = table.get("kind")
    if not isinstance(kind_name, str):
        raise ConfigError(
            f"config file {where}: key {key}.kind: missing; set kind to one of "
            f"{', '.join(sorted(registry.kinds))}"
        )
    try:
        kind = registry.kind(kind_name)
    except KeyturnError as exc:
        raise ConfigError(f"config file {where}: key {key}.kind: {exc}") from None
    for field in ("targets", "probes"):
        table[field] = _parts(where, base, registry, kind, f"{key}.{field}", table.get(field, []))
    try:
        return _resolved(kind.config_model.model_validate(table), base)
    except ValidationError as exc:
        raise ConfigError(_first_error(where, exc, key)) from None


def _default_type(registry: Registry, field: str, material: str, table: dict[str, Any]) -> object:
    """A target or probe table may leave out its type when exactly one installed type takes
    the kind's material and accepts the table's keys (as before plugins: a signing key's
    target with a ``path`` is a ``file``)."""
    plugins = registry.targets if field == "targets" else registry.probes
    takers = [t for t, p in plugins.items() if material in p.accepts]
    if len(takers) > 1:
        fitting = []
        for t in takers:
            try:
                plugins[t].config_model.model_validate({**table, "type": t})
            except ValidationError:
                continue
            fitting.append(t)
        takers = fitting
    return takers[0] if len(takers) == 1 else None


def _parts(
    where: object, base: Path, registry: Registry, kind: KindPlugin, key: str, items: object
) -> list[PluginModel]:
    """A credential's targets (or probes), each validated by its type's model; each type must
    take the kind's material."""
    probes = key.endswith(".probes")
    plugins: Mapping[str, TargetPlugin | ProbePlugin] = (
        registry.probes if probes else registry.targets
    )
    if not isinstance(items, list):
        raise ConfigError(f"config file {where}: key {key}: expected a list of tables")
    built: list[PluginModel] = []
    for i, item in enumerate(items):
        at = f"{key}[{i}]"
        if isinstance(item, dict) and "type" not in item:
            field = "probes" if probes else "targets"
            item = {**item, "type": _default_type(registry, field, kind.material, item)}
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise ConfigError(f"config file {where}: key {at}.type: missing; name its type")
        try:
            plugin = registry.probe(item["type"]) if probes else registry.target(item["type"])
        except KeyturnError as exc:
            raise ConfigError(f"config file {where}: key {at}.type: {exc}") from None
        if kind.material not in plugin.accepts:
            takers = sorted(t for t, p in plugins.items() if kind.material in p.accepts)
            what = "probes" if probes else "targets"
            wanted = " or ".join(f'type = "{t}"' for t in takers) or "no installed type"
            raise ConfigError(
                f"config file {where}: key {at}.type: a {kind.name} deploys to {wanted}"
                f' {what}, not "{item["type"]}"'
            )
        try:
            built.append(_resolved(plugin.config_model.model_validate(item), base))
        except ValidationError as exc:
            raise ConfigError(_first_error(where, exc, at)) from None
    return built


M = TypeVar("M", bound=PluginModel)


def _resolved(model: M, base: Path) -> M:
    """Relative paths in a plugin's model are relative to the config file's directory."""
    changes = {
        name: base / value
        for name, value in model
        if isinstance(value, Path) and not value.is_absolute()
    }
    return model.model_copy(update=changes) if changes else model

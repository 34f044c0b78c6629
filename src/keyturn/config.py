"""TOML configuration, validated into typed models. Errors name the true source of a bad value
(the file and the key, or the environment variable) and the fix."""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from keyturn.domain import schedule as sched
from keyturn.domain.errors import ConfigError, KeyturnError
from keyturn.engine.registry import Registry, discovered
from keyturn.engine.spi import (
    MEMBER_SEP,
    CredentialConfig,
    KindPlugin,
    PluginModel,
    ProbePlugin,
    TargetPlugin,
)

DEFAULT_CONFIG_NAME = "keyturn.toml"
CONFIG_ENV = "KEYTURN_CONFIG"
DATABASE_URL_ENV = "KEYTURN_DATABASE_URL"
#: How to point keyturn at a configuration (the fix of every "no config" error).
POINT_AT_CONFIG = (
    f"pass --config FILE, set {CONFIG_ENV}=FILE, or create one with `keyturn init DIR`"
)


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
        try:
            urlsplit(v).port  # noqa: B018 - a port that is not a number raises here
        except ValueError:
            raise ValueError("its port is not a number") from None
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
    #: At most this many scheduled rotations of credentials of this provider in flight at once
    #: (manual `keyturn rotate` respects it unless --now). Unset: no limit.
    max_concurrent_rotations: int | None = Field(default=None, ge=1)

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/")


class LoggingConfig(_Model):
    format: Literal["auto", "console", "json"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class WindowConfig(_Model):
    #: Weekdays (mon ... sun); all of them by default.
    days: list[str] = Field(default_factory=lambda: list(sched._WEEKDAYS))
    #: START-END of local time, START before END (24:00 is the end of the day).
    hours: str = "00:00-24:00"
    #: Default: the policy's timezone.
    timezone: str | None = None


class PolicyConfig(_Model):
    """A rotation policy (``[policies.NAME]``); every key may be left out (inherited from
    ``[policies.default]``, and overridden per credential in ``[credentials.NAME.schedule]``)."""

    every: str | None = None
    cron: str | None = None
    timezone: str | None = None
    max_age: str | None = None
    min_age: str | None = None
    windows: list[WindowConfig] | None = None
    jitter: str | None = None
    stagger: str | None = None
    group: str | None = None
    max_concurrent: int | None = Field(default=None, ge=1)
    bake: str | None = None
    approval: Literal["none", "before_start", "before_deactivate"] | None = None
    approval_timeout: str | None = None


class FreezeConfig(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: datetime = Field(alias="from")
    to: datetime
    reason: str
    #: The groups it freezes; none named: every credential.
    groups: list[str] = Field(default_factory=list)

    @field_validator("from_", "to")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError(
                "a freeze time needs an offset (e.g. 2026-12-20T00:00:00+01:00 or ...Z)"
            )
        return v.astimezone(UTC)


class ScheduleConfig(_Model):
    #: Seconds between two looks of a worker's scheduler for due slots.
    tick_seconds: float = Field(default=5.0, gt=0)
    #: Due slots fired per tick, at most.
    batch: int = Field(default=100, ge=1, le=10000)
    #: Tests only: the schedule runs on a clock shared through the database (offset and scale,
    #: set with `keyturn clock set`) instead of the database's own clock.
    test_clock: bool = False


_NOTICE_KINDS = (
    "halted",
    "holder_lost",
    "awaiting_approval",
    "waiting",
    "rolled_back",
    "completed",
    "cancelled",
    "escalated",
)
#: Notifications addressed to a person (they name them and may carry their link): a sink takes
#: them only when its `events` lists them (a users' mailer), never by default.
_PERSONAL_KINDS = ("user_task", "reminder")
_OPENING_KINDS = ("halted", "holder_lost", "awaiting_approval", "waiting")
NoticeKindName = Literal[
    "halted",
    "holder_lost",
    "awaiting_approval",
    "waiting",
    "rolled_back",
    "completed",
    "cancelled",
    "user_task",
    "reminder",
    "escalated",
]


def _http_url(v: str) -> str:
    if not (v.startswith("http://") or v.startswith("https://")):
        raise ValueError("expected an http:// or https:// URL")
    return v


class _SinkConfig(_Model):
    #: The notification kinds this sink takes (default: every kind but those addressed to a
    #: person, user_task and reminder; for alertmanager and pagerduty: halted and holder_lost).
    events: list[NoticeKindName] | None = None

    def kinds(self) -> list[str]:
        return list(self.events) if self.events is not None else list(_NOTICE_KINDS)


class _SecretSink(_SinkConfig):
    def secret_source(self, field: str) -> tuple[str | None, Path | None]:
        env, file = getattr(self, f"{field}_env"), getattr(self, f"{field}_file")
        if (env is None) == (file is None):
            raise ValueError(f"set exactly one of {field}_env and {field}_file")
        return env, file


class WebhookSinkConfig(_SecretSink):
    """Any HTTP endpoint: the notification POSTed as JSON, signed with HMAC-SHA256 (header
    Keyturn-Signature)."""

    type: Literal["http"]
    url: str
    #: The HMAC key: an environment variable's name, or a file of mode 0600.
    secret_env: str | None = None
    secret_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        return _http_url(v)

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookSinkConfig:
        self.secret_source("secret")
        return self


class SlackSinkConfig(_SecretSink):
    """Slack's incoming-message URL: it is the secret (environment variable or 0600 file)."""

    type: Literal["slack"]
    url_env: str | None = None
    url_file: Path | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> SlackSinkConfig:
        self.secret_source("url")
        return self


class AlertmanagerSinkConfig(_SinkConfig):
    """Prometheus Alertmanager: url is its base (http://alertmanager:9093)."""

    type: Literal["alertmanager"]
    url: str
    #: Re-send a firing alert this often; keep it well below Alertmanager's resolve_timeout.
    resend_seconds: float = Field(default=60.0, gt=0)
    #: Labels added to every alert (e.g. severity, team).
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        return _http_url(v)

    def kinds(self) -> list[str]:
        return list(self.events) if self.events is not None else ["halted", "holder_lost"]

    @field_validator("events")
    @classmethod
    def _opening_only(cls, v: list[str] | None) -> list[str] | None:
        return _opening_only(v)


class PagerDutySinkConfig(_SecretSink):
    """PagerDuty Events v2: one incident per rotation (dedup_key keyturn-<rotation id>)."""

    type: Literal["pagerduty"]
    #: The integration's routing key: an environment variable's name, or a 0600 file.
    routing_key_env: str | None = None
    routing_key_file: Path | None = None
    events_url: str = "https://events.pagerduty.com/v2/enqueue"

    @field_validator("events_url")
    @classmethod
    def _http(cls, v: str) -> str:
        return _http_url(v)

    @model_validator(mode="after")
    def _one_secret(self) -> PagerDutySinkConfig:
        self.secret_source("routing_key")
        return self

    def kinds(self) -> list[str]:
        return list(self.events) if self.events is not None else ["halted", "holder_lost"]

    @field_validator("events")
    @classmethod
    def _opening_only(cls, v: list[str] | None) -> list[str] | None:
        return _opening_only(v)


def _opening_only(v: list[str] | None) -> list[str] | None:
    ends = sorted(set(v or ()) - set(_OPENING_KINDS))
    if ends:
        raise ValueError(
            f"{', '.join(ends)} cannot be listed: this sink resolves what a rotation opened "
            f"when it ends, by itself; list only {', '.join(_OPENING_KINDS)}"
        )
    return v


SinkConfig = Annotated[
    WebhookSinkConfig | SlackSinkConfig | AlertmanagerSinkConfig | PagerDutySinkConfig,
    Field(discriminator="type"),
]


class NotificationsConfig(_Model):
    """``[notifications]`` and its ``[notifications.sinks.NAME]`` tables."""

    sinks: dict[str, SinkConfig] = Field(default_factory=dict)
    #: Seconds between two looks at the outbox when nothing was due.
    poll_seconds: float = Field(default=1.0, gt=0)
    #: Each request's timeout.
    timeout_seconds: float = Field(default=10.0, gt=0)
    #: Retry 429s, 5xx and network errors for this long after the first attempt, then fail.
    retry_for_seconds: float = Field(default=3600.0, gt=0)
    backoff_base_seconds: float = Field(default=1.0, gt=0)
    backoff_max_seconds: float = Field(default=60.0, gt=0)
    #: Deliveries sent at once per process.
    batch: int = Field(default=20, ge=1, le=1000)
    #: A lease expired this long with no worker taking the rotation over is a lost holder.
    holder_lost_after_seconds: float = Field(default=60.0, gt=0)
    #: Attempts, and deliveries and notifications done with, are deleted after this many days.
    keep_days: float = Field(default=30.0, gt=0)


class ServeConfig(_Model):
    #: Who may read `keyturn serve`'s /metrics: "token" (a viewer token or above), "open"
    #: (anyone who reaches the port: for a Prometheus on a trusted network) or "off".
    metrics: Literal["token", "open", "off"] = "token"


class Config(_Model):
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    keys: KeysConfig = Field(default_factory=KeysConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    #: Each table validated by its kind's model (see :func:`load_config`).
    credentials: dict[str, CredentialConfig] = Field(default_factory=dict)
    policies: dict[str, PolicyConfig] = Field(default_factory=dict)
    freeze: list[FreezeConfig] = Field(default_factory=list)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    notifications: NotificationsConfig = Field(default_factory=NotificationsConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    #: Where the file was read from (paths in it are relative to its directory).
    source: Path | None = None
    #: Where database.url came from, for errors: "database.url in FILE" or
    #: "environment variable KEYTURN_DATABASE_URL" (set by :func:`load_config`).
    database_url_from: str = "database.url"
    _policies: dict[str, sched.Policy] = PrivateAttr(default_factory=dict)

    @property
    def freezes(self) -> list[sched.Freeze]:
        return [sched.Freeze(f.from_, f.to, f.reason, frozenset(f.groups)) for f in self.freeze]

    def policy_of(self, credential: str) -> sched.Policy | None:
        """The resolved policy of a configured credential (None: rotated by hand only)."""
        return self._policies.get(credential)

    @property
    def policies_by_credential(self) -> dict[str, sched.Policy]:
        """Every configured credential's policy (also those that start nothing by themselves
        but gate their rotations: bake, approval, windows, freezes)."""
        return dict(self._policies)

    @property
    def scheduled_policies(self) -> dict[str, sched.Policy]:
        """The credentials whose policy starts rotations (every, cron or max_age)."""
        return {c: p for c, p in self._policies.items() if p.scheduled}

    def configured(self, name: str) -> CredentialConfig | None:
        """The configuration of the managed credential `name`: its own entry, or for a member
        ``ENTRY:MEMBER`` the entry's when that entry has members."""
        found = self.credentials.get(name)
        if found is None and MEMBER_SEP in name:
            entry = self.credentials.get(name.split(MEMBER_SEP, 1)[0])
            if entry is not None and entry.has_members:
                return entry
        return found

    def credential(self, name: str) -> CredentialConfig:
        found = self.configured(name)
        if found is not None:
            return found
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
    notifications = raw.get("notifications")
    sinks = notifications.get("sinks") if isinstance(notifications, dict) else None
    for sink in sinks.values() if isinstance(sinks, dict) else ():
        for key in ("secret_file", "url_file", "routing_key_file"):
            if isinstance(sink, dict) and isinstance(sink.get(key), str):
                sink[key] = str(_resolve(base, Path(sink[key])))
    keys = raw.get("keys")
    if isinstance(keys, dict):
        if isinstance(keys.get("master_key_file"), str):
            keys["master_key_file"] = str(_resolve(base, Path(keys["master_key_file"])))
        prev = keys.get("previous_master_key_files")
        if isinstance(prev, list):
            keys["previous_master_key_files"] = [
                str(_resolve(base, Path(p))) if isinstance(p, str) else p for p in prev
            ]


def _read(path: Path, named: str) -> dict[str, object]:
    """The TOML table of `path`; `named` says how keyturn was pointed at it (for errors)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{named} does not exist; {POINT_AT_CONFIG}") from None
    except IsADirectoryError:
        raise ConfigError(f"{named} is a directory, not a file; {POINT_AT_CONFIG}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{named} is not UTF-8 text (byte {exc.start}); save it as UTF-8 TOML"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{named} cannot be read ({exc.strerror or type(exc).__name__}); check its path "
            "and permissions"
        ) from None
    try:
        raw: dict[str, object] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc}); fix the syntax") from None
    _absolutise(raw, path.resolve().parent)
    raw["source"] = str(path)
    return raw


def _locate(path: Path | None) -> tuple[Path, str]:
    """The config file to read and how keyturn was pointed at it: `path` (--config), else
    KEYTURN_CONFIG, else ./keyturn.toml; none of them is a ConfigError saying where keyturn
    looked and how to point it at a file (never a default database created by accident)."""
    if path is not None:
        return path, f"config file {path}"
    env = os.environ.get(CONFIG_ENV, "").strip()
    if env:
        return Path(env), f"config file {env} (from environment variable {CONFIG_ENV})"
    local = Path(DEFAULT_CONFIG_NAME)
    if local.exists():
        return local, f"config file {local}"
    raise ConfigError(
        f"no configuration found: no --config given, {CONFIG_ENV} is not set and there is no "
        f"{DEFAULT_CONFIG_NAME} in {Path.cwd()}; {POINT_AT_CONFIG}"
    )


def _env_database_url(where: object) -> str | None:
    """KEYTURN_DATABASE_URL, checked on its own so an error names the variable, not the file
    whose database.url it overrides."""
    env_url = os.environ.get(DATABASE_URL_ENV, "").strip()
    if not env_url:
        return None
    try:
        DatabaseConfig.model_validate({"url": env_url})
    except ValidationError as exc:
        msg = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise ConfigError(
            f"environment variable {DATABASE_URL_ENV}: {msg}; fix or unset it (it overrides "
            f"database.url of {where})"
        ) from None
    return env_url


def load_config(path: Path | None, registry: Registry | None = None) -> Config:
    """Read and validate a config file: `path`, else KEYTURN_CONFIG, else ./keyturn.toml; with
    none of them a ConfigError (there are no defaults to fall back on: keys and providers must
    be configured). KEYTURN_DATABASE_URL overrides database.url."""
    path, named = _locate(path)
    raw = _read(path, named)
    where = path
    env_url = _env_database_url(where)
    db_table = raw.get("database")
    set_here = isinstance(db_table, dict) and "url" in db_table
    url_from = (
        f"database.url in {path}" if set_here else f"database.url (default; {path} sets none)"
    )
    if env_url:
        db = raw.setdefault("database", {})
        if isinstance(db, dict):
            db["url"] = env_url
            url_from = f"environment variable {DATABASE_URL_ENV}"
    raw["database_url_from"] = url_from
    registry = registry or discovered()
    base = path.resolve().parent
    if "notifications" in raw:
        raw["notifications"] = _notifications(where, raw["notifications"])
    tables = raw.pop("credentials", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"config file {where}: key credentials: expected a table of tables")
    credentials = {
        name: _credential(where, base, registry, str(name), table) for name, table in tables.items()
    }
    try:
        config = Config.model_validate({**raw, "credentials": credentials})
    except ValidationError as exc:
        raise ConfigError(_first_error(where, exc, model=Config)) from None
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
    _resolve_policies(where, config)
    return config


_SINK_MODELS: dict[str, type[_SinkConfig]] = {
    "http": WebhookSinkConfig,
    "slack": SlackSinkConfig,
    "alertmanager": AlertmanagerSinkConfig,
    "pagerduty": PagerDutySinkConfig,
}


def _notifications(where: object, table: object) -> NotificationsConfig:
    """``[notifications]``: each sink validated by its type's model, so an error names the
    sink's own key (not the union's branch) and the fix."""
    if not isinstance(table, dict):
        raise ConfigError(f"config file {where}: key notifications: expected a table")
    table = dict(table)
    sinks = table.pop("sinks", {})
    if not isinstance(sinks, dict):
        raise ConfigError(f"config file {where}: key notifications.sinks: expected a table")
    types = ", ".join(_SINK_MODELS)
    built: dict[str, _SinkConfig] = {}
    for name, sink in sinks.items():
        key = f"notifications.sinks.{name}"
        if not isinstance(sink, dict):
            raise ConfigError(f"config file {where}: key {key}: expected a table")
        kind = sink.get("type")
        model = _SINK_MODELS.get(kind) if isinstance(kind, str) else None
        if model is None:
            what = "missing" if kind is None else f"{kind!r} is not a sink type"
            raise ConfigError(f"config file {where}: key {key}.type: {what}; use one of {types}")
        try:
            built[name] = model.model_validate(sink)
        except ValidationError as exc:
            others = {f"{t} sinks": m for t, m in _SINK_MODELS.items() if t != kind}
            line = _first_error(
                where, exc, key, model=model, what=f'sink of type "{kind}"', others=others
            )
            raise ConfigError(line.replace("Value error, ", "")) from None
    try:
        return NotificationsConfig.model_validate({**table, "sinks": built})
    except ValidationError as exc:
        line = _first_error(where, exc, "notifications", model=NotificationsConfig)
        raise ConfigError(line.replace("Value error, ", "")) from None


def _windows(
    tables: list[dict[str, Any]], tz: str, fail: Callable[[str, str], ConfigError]
) -> list[sched.Window]:
    windows = []
    for i, w in enumerate(tables):
        try:
            start, end = sched.parse_hours(w["hours"])
            windows.append(
                sched.Window(sched.parse_days(w["days"]), start, end, w.get("timezone") or tz)
            )
        except sched.ScheduleError as exc:
            raise fail(f"windows[{i}]", str(exc)) from None
    return windows


_DURATIONS = ("every", "max_age", "min_age", "jitter", "stagger", "bake", "approval_timeout")


def _resolve_policies(where: object, config: Config, now: datetime | None = None) -> None:
    """Resolve every credential's policy (default < named < its overrides) into a
    :class:`keyturn.domain.schedule.Policy`, refusing what cannot work: one line naming the
    file, the key and the fix."""
    now = now or datetime.now(UTC)
    freezes = config.freezes
    for i, f in enumerate(config.freeze):
        if f.to <= f.from_:
            raise ConfigError(
                f"config file {where}: key freeze[{i}].to: it is not after from; swap them"
            )
    named = config.policies
    for each in named:
        _policy(where, f"policies.{each}", each, [named.get("default"), named[each]], freezes, now)
    for cname, cred in config.credentials.items():
        pname = cred.policy
        if pname is not None and pname not in named:
            known = ", ".join(sorted(named)) or "none is defined"
            raise ConfigError(
                f"config file {where}: key credentials.{cname}.policy: no policy named "
                f"{pname!r} ({known}); define [policies.{pname}] or fix the name"
            )
        if pname is None and "default" in named:
            pname = "default"
        try:
            override = PolicyConfig.model_validate(cred.schedule)
        except ValidationError as exc:
            raise ConfigError(
                _first_error(where, exc, f"credentials.{cname}.schedule", model=PolicyConfig)
            ) from None
        if pname is None and not cred.schedule:
            continue
        layers = [named.get("default"), named.get(pname) if pname else None, override]
        policy = _policy(
            where, f"credentials.{cname}.schedule", pname or cname, layers, freezes, now
        )
        config._policies[cname] = policy


def _policy(
    where: object,
    key: str,
    name: str,
    layers: list[PolicyConfig | None],
    freezes: list[sched.Freeze],
    now: datetime,
) -> sched.Policy:
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:
            merged.update(layer.model_dump(exclude_none=True))
    tz = merged.get("timezone") or "UTC"

    def fail(field: str, msg: str) -> ConfigError:
        return ConfigError(f"config file {where}: key {key}.{field}: {msg}")

    durations: dict[str, timedelta] = {}
    for field in _DURATIONS:
        if field in merged:
            try:
                durations[field] = sched.parse_duration(str(merged[field]))
            except sched.ScheduleError as exc:
                raise fail(field, str(exc)) from None
    try:
        sched.zone(tz)
    except sched.ScheduleError as exc:
        raise fail("timezone", str(exc)) from None
    windows = _windows(merged.get("windows") or [], tz, fail)
    if "every" in merged and "cron" in merged:
        raise fail("cron", "both every and cron are set; keep one of them")
    try:
        policy = sched.Policy(
            name=name,
            every=durations.get("every"),
            cron=merged.get("cron"),
            timezone=tz,
            max_age=durations.get("max_age"),
            min_age_=durations.get("min_age"),
            windows=tuple(windows),
            jitter=durations.get("jitter", timedelta(0)),
            stagger=durations.get("stagger", timedelta(0)),
            group=merged.get("group"),
            max_concurrent=merged.get("max_concurrent"),
            bake=durations.get("bake", timedelta(0)),
            approval=merged.get("approval", "none"),
            approval_timeout=durations.get("approval_timeout", timedelta(days=7)),
        )
    except sched.ScheduleError as exc:
        raise fail("cron", str(exc)) from None
    for field, problem in sched.problems(policy, freezes, now):
        if field.startswith("freeze["):  # the freeze's own key, not the policy's
            raise ConfigError(f"config file {where}: key {field}: {problem} (policy {name})")
        raise fail(field, problem)
    return policy


def _first_error(
    where: object,
    exc: ValidationError,
    prefix: str = "",
    *,
    model: type[BaseModel] | None = None,
    what: str = "",
    others: Mapping[str, type[BaseModel]] | None = None,
) -> str:
    """One line for the first problem: file, key, what is wrong and the fix. For an unknown
    key, `model` (the model validated) suggests the nearest known key; `others` (the models of
    the other kinds or types, by name) tell a key that belongs to another one of them (`what`,
    e.g. "<kind> credential") from a misspelt one."""
    first = exc.errors()[0]
    key = ".".join(str(p) for p in (*([prefix] if prefix else []), *first["loc"]))
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        loc = tuple(first["loc"])
        known = _fields_at(model, loc[:-1]) if model is not None else None
        msg = _unknown_key(str(loc[-1]), known, what, others if len(loc) == 1 else None)
    return f"config file {where}: key {key}: {msg}{more}"


def _unknown_key(
    name: str,
    known: Iterable[str] | None,
    what: str,
    others: Mapping[str, type[BaseModel]] | None,
) -> str:
    owners = sorted(n for n, m in (others or {}).items() if name in m.model_fields)
    if owners and what:
        return f"does not apply to a {what} (it is a key of {' and '.join(owners)} only); remove it"
    close = difflib.get_close_matches(name, sorted(known or ()), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown key; {hint}check its spelling against config/keyturn.example.toml"


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> set[str] | None:
    """The keys the model nested at `loc` takes (None when `loc` leads to no model)."""
    from typing import get_args, get_origin

    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
            continue
        if get_origin(current) is dict:  # e.g. providers.NAME: the NAME step
            current = get_args(current)[1]
            continue
        return None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return set(current.model_fields)
    return None


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
        others = {n: k.config_model for n, k in registry.kinds.items() if n != kind.name}
        raise ConfigError(
            _first_error(
                where,
                exc,
                key,
                model=kind.config_model,
                what=f"{kind.name} credential",
                others={f"{n} credentials": m for n, m in others.items()},
            )
        ) from None


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
            takers = sorted(t for t, p in plugins.items() if kind.material in p.accepts)
            keys = sorted(k for k in item if k != "type") if isinstance(item, dict) else []
            fits = f"no installed type takes the keys {', '.join(keys)}; " if keys else ""
            raise ConfigError(
                f"config file {where}: key {at}.type: missing; {fits}name its type"
                + (f" ({', '.join(takers)})" if takers else "")
            )
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
            what = "probe" if probes else "target"
            others = {
                f"{t} {what}s": p.config_model for t, p in plugins.items() if t != item["type"]
            }
            raise ConfigError(
                _first_error(
                    where,
                    exc,
                    at,
                    model=plugin.config_model,
                    what=f"{item['type']} {what}",
                    others=others,
                )
            ) from None
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

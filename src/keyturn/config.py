"""TOML configuration, validated into typed models. Errors name the file, the key and the fix."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from keyturn.domain.errors import ConfigError
from keyturn.domain.model import CredentialKind

ALGORITHMS = ("ed25519", "ecdsa-p256", "rsa-2048")
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


class TargetConfig(_Model):
    #: "file": a directory that receives private_key.pem and credential.json (signing keys).
    #: "secrets_file": a JSON file listing the webhook secrets a receiver accepts.
    type: Literal["file", "secrets_file"] = "file"
    path: Path
    name: str | None = None


class ProbeConfig(_Model):
    #: A keyturn-compatible receiver that reports the secrets version it has loaded
    #: (GET {url}/_receiver/state).
    type: Literal["receiver"] = "receiver"
    url: str
    name: str | None = None


class CredentialConfig(_Model):
    kind: CredentialKind
    provider: str
    #: How a new key is registered: Create Credential, or the service-account credential endpoint.
    registration: Literal["credentials", "service_account_endpoint"] = "credentials"
    algorithm: Literal["ed25519", "ecdsa-p256", "rsa-2048"] = "ed25519"
    #: The bearer token: from this environment variable, or this file; otherwise the one stored
    #: encrypted when the credential was imported.
    token_env: str | None = None
    token_file: Path | None = None
    targets: list[TargetConfig] = Field(default_factory=list)
    #: Webhooks only: the managed credential (service account or PAT) whose token and current
    #: key sign the webhook calls; the receivers to confirm; the wait for in-flight deliveries.
    signer: str | None = None
    probes: list[ProbeConfig] = Field(default_factory=list)
    grace_seconds: float = Field(default=5.0, ge=0)


class LoggingConfig(_Model):
    format: Literal["auto", "console", "json"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Model):
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    keys: KeysConfig = Field(default_factory=KeysConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
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
    creds = raw.get("credentials")
    if isinstance(creds, dict):
        for cred in creds.values():
            if not isinstance(cred, dict):
                continue
            if isinstance(cred.get("token_file"), str):
                cred["token_file"] = str(_resolve(base, Path(cred["token_file"])))
            for target in cred.get("targets", []) or []:
                if isinstance(target, dict) and isinstance(target.get("path"), str):
                    target["path"] = str(_resolve(base, Path(target["path"])))


def load_config(path: Path | None) -> Config:
    """Read and validate a config file; with no path, KEYTURN_CONFIG, then ./keyturn.toml, then
    defaults. KEYTURN_DATABASE_URL overrides database.url."""
    if path is None and os.environ.get("KEYTURN_CONFIG"):
        path = Path(os.environ["KEYTURN_CONFIG"])
    if path is None and Path(DEFAULT_CONFIG_NAME).is_file():
        path = Path(DEFAULT_CONFIG_NAME)
    raw: dict[str, object] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; pass --config FILE or run `keyturn init`"
            )
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"config file {path}: not valid TOML ({exc}); fix the syntax"
            ) from None
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from None
        _absolutise(raw, path.resolve().parent)
        raw["source"] = str(path)
    env_url = os.environ.get("KEYTURN_DATABASE_URL")
    if env_url:
        db = raw.setdefault("database", {})
        if isinstance(db, dict):
            db["url"] = env_url
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        where = path if path is not None else "the configuration"
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against config/keyturn.example.toml"
        raise ConfigError(f"config file {where}: key {key}: {msg}{more}") from None
    for name, cred in config.credentials.items():
        _check_credential(path, config, name, cred)
        if cred.provider not in config.providers:
            raise ConfigError(
                f"config file {path}: key credentials.{name}.provider: no provider named "
                f"{cred.provider!r}; define [providers.{cred.provider}]"
            )
    return config


def _check_credential(path: Path | None, config: Config, name: str, cred: CredentialConfig) -> None:
    where = f"config file {path}: " if path else ""
    key = f"credentials.{name}"
    wanted = "secrets_file" if cred.kind is CredentialKind.WEBHOOK else "file"
    for i, target in enumerate(cred.targets):
        if target.type != wanted:
            raise ConfigError(
                f"{where}key {key}.targets[{i}].type: a {cred.kind.value} deploys to "
                f'type = "{wanted}" targets, not "{target.type}"'
            )
    if cred.kind is CredentialKind.WEBHOOK:
        signer = config.credentials.get(cred.signer or "")
        if signer is None or signer.kind not in (
            CredentialKind.SERVICE_ACCOUNT,
            CredentialKind.PAT,
        ):
            raise ConfigError(
                f"{where}key {key}.signer: a webhook needs signer = the name of a service_account"
                " or pat credential configured here, whose key signs the webhook calls"
            )
    elif cred.signer or cred.probes:
        raise ConfigError(f"{where}key {key}: signer and probes apply to webhooks only")
    if cred.kind is CredentialKind.PAT and cred.registration != "credentials":
        raise ConfigError(
            f'{where}key {key}.registration: a PAT registers keys with "credentials" '
            "(Create Credential on its linked user)"
        )

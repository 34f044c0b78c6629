"""The composition root: the one place that wires adapters into the engine."""

from __future__ import annotations

import asyncio
import getpass
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TypeVar

from keyturn.adapters.deploy import FileTarget
from keyturn.adapters.dfns.budget import RateBudget
from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.store.budget import SharedRateBudget, shares_a_database
from keyturn.adapters.store.migrate import open_store
from keyturn.adapters.store.sql import SqlStore
from keyturn.adapters.vault import AesGcmVault, load_master_key
from keyturn.config import Config, CredentialConfig
from keyturn.domain.errors import ConfigError, KeyturnError, ProviderError
from keyturn.domain.retry import RetryPolicy
from keyturn.engine.run import CrashHook, EngineDeps, EngineSettings, no_crash
from keyturn.ports import (
    DeployTarget,
    Fence,
    KeyProvider,
    RequestBudget,
    SecretsProbe,
    SecretsTarget,
    Store,
    WebhookInfo,
    WebhookProvider,
)

T = TypeVar("T")
MASTER_KEY_ENV = "KEYTURN_MASTER_KEY"
#: Fault injection for the crash tests: the worker SIGKILLs itself at this action boundary,
#: after writing the boundary's name to the marker file (so a test can assert where it landed).
CRASH_AT_ENV = "KEYTURN_TEST_CRASH_AT"
CRASH_MARKER_ENV = "KEYTURN_TEST_CRASH_MARKER"


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def crash_hook_from_env() -> CrashHook:
    target = os.environ.get(CRASH_AT_ENV)
    marker = os.environ.get(CRASH_MARKER_ENV)
    if not target:
        return no_crash

    def hook(boundary: str) -> None:
        if boundary != target:
            return
        if marker:
            with Path(marker).open("a") as f:
                f.write(boundary + "\n")
                f.flush()
                os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    return hook


@dataclass
class Wiring:
    config: Config
    clock: SystemClock = field(default_factory=SystemClock)
    _budgets: dict[str, RequestBudget] = field(default_factory=dict)

    @cached_property
    def store(self) -> SqlStore:
        return open_store(self.config.database.url)

    @cached_property
    def keys(self) -> CryptoKeys:
        return CryptoKeys()

    @cached_property
    def vault(self) -> AesGcmVault:
        cfg = self.config.keys
        current = load_master_key(os.environ.get(MASTER_KEY_ENV), cfg.master_key_file)
        previous = [load_master_key(None, p) for p in cfg.previous_master_key_files]
        return AesGcmVault(current, previous)

    def checked_vault(self) -> AesGcmVault:
        """The vault, after checking it can open what the database holds (a wrong master key is
        a clear error before anything is written)."""
        vault = self.vault
        unknown = self.store.master_key_ids() - set(vault.key_ids)
        if unknown:
            raise ConfigError(
                f"the configured master key (id {vault.key_id}) is not the one this database's "
                f"secrets were encrypted with (id {', '.join(sorted(unknown))}); set "
                f"{MASTER_KEY_ENV} or keys.master_key_file to the right key"
            )
        return vault

    def token_for(self, name: str) -> str:
        cfg = self.config.credentials.get(name)
        if cfg is not None and cfg.token_env:
            value = os.environ.get(cfg.token_env, "").strip()
            if not value:
                raise ConfigError(
                    f"credential {name}: environment variable {cfg.token_env} (token_env) is empty "
                    "or unset; export the bearer token there"
                )
            return value
        if cfg is not None and cfg.token_file:
            try:
                return cfg.token_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"credential {name}: token_file {cfg.token_file} cannot be read "
                    f"({exc.strerror}); fix the path"
                ) from None
        credential = self.store.get_credential(name)
        if credential.token_ref is None:
            raise ConfigError(
                f"credential {name} has no bearer token: set token_env or token_file in "
                f"[credentials.{name}], or import it with --token-file"
            )
        return self.vault.open(self.store.get_secret(credential.token_ref)).decode()

    def provider_for(self, name: str, *, fence: Fence | None = None) -> KeyProvider:
        from keyturn.adapters.dfns.provider import provider_for

        credential = self.store.get_credential(name)
        provider = self.config.provider(credential.provider)
        return provider_for(
            provider.base_url,
            self.token_for(name),
            timeout=provider.timeout_seconds,
            fence=fence,
            budget=self.budget(credential.provider),
        )

    def budget(self, provider: str) -> RequestBudget | None:
        """The provider's request budget (`requests_per_minute`): one for the whole
        installation, shared through the database by every process using it, with an
        in-process budget for this process's share while the database is unavailable. One
        instance per provider, shared by every client this process makes."""
        cfg = self.config.provider(provider)
        per_minute = cfg.requests_per_minute
        if per_minute is None:
            return None
        if provider not in self._budgets:
            url = self.config.database.url
            local = RateBudget(per_minute)
            if not shares_a_database(url):
                self._budgets[provider] = local
            else:
                self._budgets[provider] = SharedRateBudget(
                    url,
                    provider,
                    interval=local.interval,
                    burst=local.burst,
                    # no burst: the shared budget may have been in full use a moment ago
                    fallback=lambda share: RateBudget(per_minute * share, burst=1),
                )
        return self._budgets[provider]

    def targets_for(self, name: str) -> list[DeployTarget]:
        cfg = self.config.credentials.get(name)
        if cfg is None:
            raise KeyturnError(
                f"credential {name} has no [credentials.{name}] section in the configuration; "
                "its deploy targets are unknown"
            )
        return [
            FileTarget(t.name or f"file:{t.path}", t.path) for t in cfg.targets if t.type == "file"
        ]

    def _cred_config(self, name: str) -> CredentialConfig:
        cfg = self.config.credentials.get(name)
        if cfg is None:
            raise KeyturnError(
                f"credential {name} has no [credentials.{name}] section in the configuration"
            )
        return cfg

    def webhooks_for(self, name: str, *, fence: Fence | None = None) -> WebhookProvider:
        from keyturn.adapters.dfns.webhook_provider import webhook_provider_for

        cfg = self._cred_config(name)
        signer_name = cfg.signer or ""
        signer = self.store.get_credential(signer_name)
        if signer.key_ref is None:
            raise KeyturnError(f"the webhook signer {signer_name} has no stored key")
        key = self.vault.open(self.store.get_secret(signer.key_ref))
        provider = self.config.provider(cfg.provider)
        inner = webhook_provider_for(
            provider.base_url,
            self.token_for(signer_name),
            signer.credential_id,
            key,
            timeout=provider.timeout_seconds,
            fence=fence,
            budget=self.budget(cfg.provider),
        )
        return _SignerAwareWebhooks(inner, self.store, signer_name, signer.key_ref)

    def secret_targets_for(self, name: str) -> list[SecretsTarget]:
        from keyturn.adapters.secrets_file import WebhookSecretsFileTarget

        cfg = self._cred_config(name)
        return [
            WebhookSecretsFileTarget(t.name or f"secrets_file:{t.path}", t.path)
            for t in cfg.targets
            if t.type == "secrets_file"
        ]

    def probes_for(self, name: str) -> list[SecretsProbe]:
        from keyturn.adapters.secrets_file import ReceiverStateProbe

        return [
            ReceiverStateProbe(p.name or f"receiver:{p.url}", p.url)
            for p in self._cred_config(name).probes
        ]

    def grace_for(self, name: str) -> float:
        return self._cred_config(name).grace_seconds

    def engine_deps(self) -> EngineDeps:
        w = self.config.worker
        settings = EngineSettings(
            lease_seconds=w.lease_seconds,
            lease_margin_seconds=min(5.0, w.lease_seconds / 4),
            retry=RetryPolicy(
                max_attempts=w.max_attempts,
                base_seconds=w.backoff_base_seconds,
                max_seconds=w.backoff_max_seconds,
            ),
            retention=timedelta(days=self.config.keys.retention_days),
            poll_seconds=w.poll_seconds,
        )
        hook = crash_hook_from_env()
        return EngineDeps(
            store=self.store,
            vault=self.checked_vault(),
            keys=self.keys,
            clock=self.clock,
            provider_for=self.provider_for,
            targets_for=self.targets_for,
            settings=settings,
            crash_hook=hook,
            webhooks_for=self.webhooks_for,
            secret_targets_for=self.secret_targets_for,
            probes_for=self.probes_for,
            grace_for=self.grace_for,
        )


class _SignerAwareWebhooks:
    """A webhook provider whose signing credential is itself managed by keyturn. When the
    provider refuses the signer while keyturn is rotating that signer (its old key deactivated
    a moment before the store points at the new one), the refusal is transient: it becomes a
    retryable error, and the next attempt signs with the signer's new key."""

    _REFUSED = frozenset({401, 403})

    def __init__(self, inner: WebhookProvider, store: Store, signer: str, key_ref: str) -> None:
        self._inner = inner
        self._store = store
        self._signer = signer
        self._key_ref = key_ref

    def _moving(self) -> bool:
        latest = self._store.latest_rotation(self._signer)
        current = self._store.get_credential(self._signer).key_ref
        return current != self._key_ref or (latest is not None and not latest.finished)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except ProviderError as exc:
            refused = exc.code == "credential_not_allowed" or exc.status in self._REFUSED
            if exc.retryable or not refused or not await asyncio.to_thread(self._moving):
                raise
            raise ProviderError(
                f"{exc} (the signer {self._signer} is being rotated; retrying with its new key)",
                retryable=True,
                status=exc.status,
                code=exc.code,
                outcome_unknown=exc.outcome_unknown,
            ) from None

    async def get_webhook(self, webhook_id: str) -> WebhookInfo | None:
        return await self._call(lambda: self._inner.get_webhook(webhook_id))

    async def list_webhooks(self) -> list[WebhookInfo]:
        return await self._call(self._inner.list_webhooks)

    async def create_webhook(
        self, *, url: str, events: Sequence[str], description: str, enabled: bool
    ) -> tuple[WebhookInfo, str]:
        return await self._call(
            lambda: self._inner.create_webhook(
                url=url, events=events, description=description, enabled=enabled
            )
        )

    async def set_enabled(self, webhook_id: str, enabled: bool) -> None:
        await self._call(lambda: self._inner.set_enabled(webhook_id, enabled))

    async def delete_webhook(self, webhook_id: str) -> None:
        await self._call(lambda: self._inner.delete_webhook(webhook_id))

    async def ping(self, webhook_id: str) -> str:
        return await self._call(lambda: self._inner.ping(webhook_id))

    async def latest_delivery(self, webhook_id: str) -> datetime | None:
        return await self._call(lambda: self._inner.latest_delivery(webhook_id))

    async def aclose(self) -> None:
        await self._inner.aclose()

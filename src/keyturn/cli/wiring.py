"""The composition root: the one place that wires adapters into the engine.

The adapters (SQLAlchemy, httpx, cryptography) are imported where they are first used, so a
command pays only for what it touches.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from keyturn.domain.errors import ConfigError, KeyturnError
from keyturn.engine.registry import discovered

if TYPE_CHECKING:
    from keyturn.adapters.keys import CryptoKeys
    from keyturn.adapters.metrics import ProcessMetrics
    from keyturn.adapters.store.outbox import SqlOutbox
    from keyturn.adapters.store.slots import SqlSlots
    from keyturn.adapters.store.sql import SqlStore
    from keyturn.adapters.vault import AesGcmVault
    from keyturn.config import Config
    from keyturn.domain.model import ManagedCredential, Rotation
    from keyturn.engine.notify import Deliverer
    from keyturn.engine.run import BlockingPool, CrashHook, EngineDeps
    from keyturn.engine.schedtime import ScheduleBook, ScheduleTime
    from keyturn.engine.spi import CredentialConfig, ProviderAccess
    from keyturn.ports import Fence, RequestBudget, Sink

T = TypeVar("T")
S = TypeVar("S")
MASTER_KEY_ENV = "KEYTURN_MASTER_KEY"
#: Fault injection for the crash tests: the worker SIGKILLs itself at this action boundary,
#: after writing the boundary's name to the marker file (so a test can assert where it landed).
CRASH_AT_ENV = "KEYTURN_TEST_CRASH_AT"
CRASH_MARKER_ENV = "KEYTURN_TEST_CRASH_MARKER"


#: How often :meth:`Wiring.now` samples the database's (or the shared test) clock again.
SCHEDULE_RESYNC_SECONDS = 5.0


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
    from keyturn.engine.run import no_crash

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
    #: This process's metrics (`worker --metrics-port`, `serve`); None: nothing is counted.
    metrics: ProcessMetrics | None = None
    _synced_at: float = float("-inf")

    @cached_property
    def store(self) -> SqlStore:
        from keyturn.adapters.store.migrate import open_store

        return open_store(self.config.database.url, source=self.config.database_url_from)

    @cached_property
    def keys(self) -> CryptoKeys:
        from keyturn.adapters.keys import CryptoKeys

        return CryptoKeys()

    def _master_key_setting(self, key: str) -> str:
        """``keys.KEY in FILE``: where a master key file was configured (for errors)."""
        return f"keys.{key} in {self.config.source}" if self.config.source else f"keys.{key}"

    @property
    def master_key_source(self) -> str:
        """Where the current master key comes from, in words an error can name."""
        from keyturn.adapters.vault import master_key_source

        return master_key_source(
            os.environ.get(MASTER_KEY_ENV),
            self.config.keys.master_key_file,
            MASTER_KEY_ENV,
            self._master_key_setting("master_key_file"),
        )

    @cached_property
    def vault(self) -> AesGcmVault:
        from keyturn.adapters.vault import AesGcmVault, load_master_key

        cfg = self.config.keys
        current = load_master_key(
            os.environ.get(MASTER_KEY_ENV),
            cfg.master_key_file,
            MASTER_KEY_ENV,
            setting=self._master_key_setting("master_key_file"),
        )
        previous = [
            load_master_key(
                None,
                p,
                MASTER_KEY_ENV,
                setting=self._master_key_setting("previous_master_key_files"),
            )
            for p in cfg.previous_master_key_files
        ]
        return AesGcmVault(current, previous, source=self.master_key_source)

    def checked_vault(self) -> AesGcmVault:
        """The vault, after checking it can open what the database holds (a wrong master key is
        a clear error before anything is written)."""
        vault = self.vault
        unknown = self.store.master_key_ids() - set(vault.key_ids)
        if unknown:
            raise ConfigError(
                f"the master key from {self.master_key_source} (id {vault.key_id}) is not the one "
                f"this database's secrets were encrypted with (id {', '.join(sorted(unknown))}); "
                f"set {MASTER_KEY_ENV} or keys.master_key_file to the right key"
            )
        return vault

    def token_for(self, name: str, credential: ManagedCredential | None = None) -> str:
        """The bearer token of credential `name`: from its token_env or token_file, else the
        vault (`credential`: its record when the caller has just read it)."""
        cfg = self.config.configured(name)
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
        if credential is None:
            credential = self.store.get_credential(name)
        if credential.token_ref is None:
            raise ConfigError(
                f"credential {name} has no bearer token: set token_env or token_file in "
                f"[credentials.{name}], or import it with --token-file"
            )
        return self.vault.open(self.store.get_secret(credential.token_ref)).decode()

    def credential_config(self, name: str) -> CredentialConfig:
        cfg = self.config.configured(name)
        if cfg is None:
            raise KeyturnError(
                f"credential {name} has no [credentials.{name}] section in the configuration"
            )
        return cfg

    def _access(self, name: str, with_key: bool, fence: Fence | None) -> ProviderAccess:
        """How to call the provider as the managed credential `name` (blocking: the store, the
        vault, a token file)."""
        from keyturn.engine.spi import ProviderAccess
        from keyturn.ports import SigningKey

        credential = self.store.get_credential(name)
        provider = self.config.provider(credential.provider)
        key: SigningKey | None = None
        if with_key:
            if not discovered().kind(credential.kind).signs_requests:
                raise KeyturnError(
                    f"credential {name} is a {credential.kind} credential: its stored material "
                    "does not sign provider calls; name a credential whose kind signs them"
                )
            if credential.key_ref is None:
                raise KeyturnError(
                    f"credential {name} has no stored signing key; import it with "
                    f"`keyturn credentials import {name} --private-key-file ...`"
                )
            pem = self.vault.open(self.store.get_secret(credential.key_ref))
            key = SigningKey(credential.credential_id, pem)
        return ProviderAccess(
            credential=name,
            provider=credential.provider,
            base_url=provider.base_url,
            token=self.token_for(name, credential),  # read once per access, not twice
            timeout_seconds=provider.timeout_seconds,
            budget=self.budget(credential.provider),
            fence=fence,
            key=key,
            observe=self.metrics.observer(credential.provider) if self.metrics else None,
        )

    async def provider_session(
        self,
        factory: Callable[[ProviderAccess], S],
        credential: str,
        *,
        with_key: bool = False,
        fence: Fence | None = None,
    ) -> S:
        import asyncio

        access = await asyncio.to_thread(self._access, credential, with_key, fence)
        return factory(access)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.pool.run(fn, *args)

    @cached_property
    def pool(self) -> BlockingPool:
        from keyturn.engine.run import BlockingPool

        return BlockingPool(self.config.worker.concurrency)

    def algorithm_of(self, private_pem: bytes) -> str:
        return self.keys.algorithm_of(private_pem)

    def now(self) -> datetime:
        """The schedule's time, re-sampled against the database every few seconds (a
        long-lived process follows a shared test clock that was set after it started)."""
        import time

        t = self.schedule_time
        if time.monotonic() - self._synced_at > SCHEDULE_RESYNC_SECONDS:
            t.sync()
            self._synced_at = time.monotonic()
        return t.now()

    async def rotation(self, rotation_id: str) -> Rotation:
        import asyncio

        return await asyncio.to_thread(self.store.get_rotation, rotation_id)

    async def evidence(self, rotation_id: str) -> dict[str, Any]:
        import asyncio

        found = await asyncio.to_thread(self.store.evidence, rotation_id)
        return {name: {**e.detail, "at": e.at.isoformat()} for name, e in found.items()}

    async def add_evidence(
        self, rotation_id: str, name: str, detail: Mapping[str, Any], *, actor: str
    ) -> bool:
        import asyncio

        from keyturn.domain.model import Event

        event = Event(
            rotation_id=rotation_id,
            at=self.clock.now(),
            kind="evidence",
            actor=actor,
            trigger=name,
            detail=dict(detail),
        )
        return await asyncio.to_thread(self.store.add_evidence, event)

    def boundary(self, name: str) -> None:
        self._crash_hook(name)

    @cached_property
    def _crash_hook(self) -> CrashHook:
        return crash_hook_from_env()

    async def open_secret(self, ref: str) -> bytes:
        import asyncio

        def open_it() -> bytes:
            return self.vault.open(self.store.get_secret(ref))

        return await asyncio.to_thread(open_it)

    # ------------------------------------------------------- what plugins' commands may do

    def add_member(
        self, entry: str, member: str, *, credential_id: str, credential_uuid: str, algorithm: str
    ) -> ManagedCredential:
        from keyturn.domain.errors import NotFound
        from keyturn.domain.model import ManagedCredential
        from keyturn.engine.spi import MEMBER_SEP

        cfg = self.config.credential(entry)
        if not cfg.has_members:
            raise KeyturnError(f"[credentials.{entry}] ({cfg.kind}) has no members")
        name = f"{entry}{MEMBER_SEP}{member}"
        try:
            return self.store.get_credential(name)
        except NotFound:
            pass
        now = self.clock.now()
        managed = ManagedCredential(
            name=name,
            kind=cfg.kind,
            provider=cfg.provider,
            credential_id=credential_id,
            credential_uuid=credential_uuid,
            key_ref=None,
            algorithm=algorithm,
            created_at=now,
            updated_at=now,
        )
        self.store.add_credential(managed, [])
        return managed

    def start(
        self, credential: str, *, reason: str, actor: str, options: Mapping[str, Any]
    ) -> Rotation:
        from keyturn.engine.operator import start_rotation

        return start_rotation(
            self.store,
            discovered(),
            self.clock,
            credential=credential,
            reason=reason,
            actor=actor,
            options=options,
        )

    def print(self, text: str) -> None:
        print(text)

    def campaign_progress(self, campaign: str | None = None) -> dict[str, dict[str, int]]:
        from keyturn.engine.campaigns import progress

        return progress(self.store, discovered(), self.now(), campaign)

    def members(self, entry: str) -> list[str]:
        from keyturn.engine.spi import MEMBER_SEP

        prefix = f"{entry}{MEMBER_SEP}"
        names = (c.name for c in self.store.list_credentials())
        return sorted(n[len(prefix) :] for n in names if n.startswith(prefix))

    def rotations_of(self, kind: str) -> list[Rotation]:
        return [r for r in self.store.list_rotations() if r.kind == kind]

    def actor(self) -> str:
        return actor()

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
            from keyturn.adapters.dfns.budget import RateBudget
            from keyturn.adapters.store.budget import SharedRateBudget, shares_a_database

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

    def start_rotation(self, name: str, *, reason: str, actor: str) -> Rotation:
        """A pending rotation of a managed credential, with the options its kind derives from
        the configuration."""
        from keyturn.engine.operator import start_rotation

        registry = discovered()
        managed = self.store.get_credential(name)
        cfg = self.config.configured(name)
        options = registry.kind(managed.kind).options(cfg) if cfg is not None else {}
        return start_rotation(
            self.store,
            registry,
            self.clock,
            credential=name,
            reason=reason,
            actor=actor,
            options=options,
        )

    def engine_deps(self, concurrency: int | None = None) -> EngineDeps:
        """The engine's dependencies; plugins' blocking calls get a pool of `concurrency`
        threads (the worker's), not the default one."""
        from keyturn.domain.retry import RetryPolicy
        from keyturn.engine.run import BlockingPool, EngineDeps, EngineSettings

        w = self.config.worker
        if concurrency is not None:
            self.pool = BlockingPool(concurrency)
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
            blocking_threads=concurrency or w.concurrency,
        )
        hook = crash_hook_from_env()
        return EngineDeps(
            store=self.store,
            vault=self.checked_vault(),
            keys=self.keys,
            clock=self.clock,
            services=self,
            settings=settings,
            crash_hook=hook,
            schedule=self.schedule_book,
            slots=self.slots,
            schedule_time=self.schedule_time,
            metrics=self.metrics,
        )

    @cached_property
    def slots(self) -> SqlSlots:
        from keyturn.adapters.store.slots import SqlSlots

        return SqlSlots(self.store)

    @cached_property
    def schedule_time(self) -> ScheduleTime:
        """The schedule's clock: the database's (or the tests' shared one), sampled now."""
        from keyturn.engine.schedtime import ScheduleTime

        t = ScheduleTime(self.clock, self.slots, shared_test_clock=self.config.schedule.test_clock)
        t.sync()
        return t

    @cached_property
    def schedule_book(self) -> ScheduleBook:
        from keyturn.engine.schedtime import ScheduleBook

        cfg = self.config
        return ScheduleBook(
            policies=cfg.policies_by_credential,
            freezes=cfg.freezes,
            providers={n: c.provider for n, c in cfg.credentials.items()},
            provider_limits={
                n: p.max_concurrent_rotations
                for n, p in cfg.providers.items()
                if p.max_concurrent_rotations is not None
            },
            tick_seconds=cfg.schedule.tick_seconds,
            batch=cfg.schedule.batch,
        )

    # ----------------------------------------------------------------- notifications

    @cached_property
    def outbox(self) -> SqlOutbox:
        from keyturn.adapters.store.outbox import SqlOutbox

        return SqlOutbox(self.store)

    def sinks(self) -> list[Sink]:
        """The configured notification sinks, their secrets read now (a missing variable or a
        file readable by others is one line naming the key and the fix)."""
        from keyturn.adapters import sinks as s
        from keyturn.config import (
            AlertmanagerSinkConfig,
            PagerDutySinkConfig,
            SlackSinkConfig,
            WebhookSinkConfig,
        )

        cfg = self.config.notifications
        where = f"config file {self.config.source}: key " if self.config.source else "key "
        built: list[Sink] = []
        for name, sink in cfg.sinks.items():
            key = f"{where}notifications.sinks.{name}"

            def secret(field: str, sink: object = sink, key: str = key) -> str:
                env, file = sink.secret_source(field)  # type: ignore[attr-defined]
                setting = f"{key}.{field}_env" if env else f"{key}.{field}_file"
                return s.read_secret(env, file, setting)

            common: dict[str, Any] = {"timeout": cfg.timeout_seconds}
            if isinstance(sink, WebhookSinkConfig):
                built.append(
                    s.WebhookSink(name, sink.kinds(), url=sink.url, key=secret("secret"), **common)
                )
            elif isinstance(sink, SlackSinkConfig):
                built.append(s.SlackSink(name, sink.kinds(), url=secret("url"), **common))
            elif isinstance(sink, AlertmanagerSinkConfig):
                built.append(
                    s.AlertmanagerSink(
                        name,
                        sink.kinds(),
                        url=sink.url,
                        resend_seconds=sink.resend_seconds,
                        labels=sink.labels,
                        **common,
                    )
                )
            elif isinstance(sink, PagerDutySinkConfig):
                built.append(
                    s.PagerDutySink(
                        name,
                        sink.kinds(),
                        routing_key=secret("routing_key"),
                        events_url=sink.events_url,
                        **common,
                    )
                )
        return built

    def deliverer(self, owner: str) -> Deliverer | None:
        """The outbox's delivery loop for this process (None when no sink is configured)."""
        sinks = self.sinks()
        if not sinks:
            return None
        from keyturn.engine.notify import Deliverer, DeliverySettings

        cfg = self.config.notifications
        settings = DeliverySettings(
            poll_seconds=cfg.poll_seconds,
            batch=cfg.batch,
            timeout_seconds=cfg.timeout_seconds,
            retry_for_seconds=cfg.retry_for_seconds,
            backoff_base_seconds=cfg.backoff_base_seconds,
            backoff_max_seconds=cfg.backoff_max_seconds,
            holder_lost_after_seconds=cfg.holder_lost_after_seconds,
            keep_days=cfg.keep_days,
        )
        return Deliverer(self.outbox, sinks, self.clock, settings, owner, reveal=self.reveal)

    def reveal(self, secret_id: str) -> str:
        """A sealed link in clear, for what a sink receives (the deliverer's ``reveal``):
        SecretError when it is purged or cannot be opened, NotFound when there is none."""
        return self.vault.open(self.store.get_secret(secret_id)).decode()

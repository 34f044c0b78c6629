"""The engine-overhead bench's worker process: keyturn's real Worker, SqlStore, vault and key
generation, with a provider that answers at once and a deploy target that writes nothing.

    python tests/bench/bench_worker.py <database url> <concurrency> <log file>

The master key comes from BENCH_MASTER_KEY (a throwaway key made by the bench). BENCH_PROFILE=<dir>
writes cProfile stats per worker there (main thread only). SIGTERM or SIGINT stop the worker the
way `keyturn worker` stops. Not a test module (pytest does not collect it).
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import signal
import sys
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog

from keyturn import logs
from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.store.sql import SqlStore
from keyturn.adapters.vault import AesGcmVault, parse_master_key
from keyturn.cli.wiring import SystemClock
from keyturn.engine.registry import Registry
from keyturn.engine.run import EngineDeps, EngineSettings
from keyturn.engine.spi import CredentialConfig, ProviderAccess, Services, TargetConfig
from keyturn.engine.worker import Worker
from keyturn.kinds.signing_key import SERVICE_ACCOUNT, SigningKeyConfig
from keyturn.ports import (
    DeployedMaterial,
    Fence,
    ProviderCredential,
    SigningKey,
)

T = TypeVar("T")
S = TypeVar("S")

#: How many credentials' state the fakes keep (far more than rotations in flight): bounded, so
#: the bench harness itself never makes the worker's memory grow with the number of rotations.
KEEP = 4096


@dataclass
class _Accounts:
    """Provider-side credentials of recently rotated accounts (name -> credentials)."""

    by_name: OrderedDict[str, list[ProviderCredential]] = field(default_factory=OrderedDict)

    def of(self, name: str) -> list[ProviderCredential]:
        creds = self.by_name.get(name)
        if creds is None:
            creds = self.by_name[name] = []
            if len(self.by_name) > KEEP:
                self.by_name.popitem(last=False)
        return creds


ACCOUNTS = _Accounts()


class InstantProvider:
    """A KeyProvider that accepts any signer and answers at once (no I/O)."""

    def __init__(self, name: str, fence: Fence | None) -> None:
        self.name = name
        self.fence = fence

    def _check(self) -> None:
        if self.fence is not None:
            self.fence()

    async def register_key(
        self, *, signer: SigningKey, new_key: SigningKey, name: str, via: str
    ) -> ProviderCredential:
        self._check()
        cred = ProviderCredential(
            credential_id=new_key.credential_id,
            credential_uuid=f"cr-{uuid.uuid4().hex}",
            is_active=True,
            public_key="",
            name=name,
        )
        ACCOUNTS.of(self.name).append(cred)
        return cred

    async def list_credentials(self) -> list[ProviderCredential]:
        self._check()
        return list(ACCOUNTS.of(self.name))

    async def activate(self, *, signer: SigningKey, credential_uuid: str) -> None:
        self._check()

    async def deactivate(self, *, signer: SigningKey, credential_uuid: str) -> None:
        self._check()

    async def prove(self, *, signer: SigningKey) -> None:
        self._check()

    async def aclose(self) -> None:
        return None


class NullTarget:
    """A signing-key target that writes nothing: stage keeps the material in memory (for the
    most recent KEEP credentials only), read_back returns it, promote and rollback note it."""

    held: OrderedDict[str, DeployedMaterial] = OrderedDict()

    def __init__(self, credential: str) -> None:
        self.credential = credential

    @property
    def name(self) -> str:
        return "null"

    def _keep(self, material: DeployedMaterial) -> dict[str, object]:
        self.held[self.credential] = material
        self.held.move_to_end(self.credential)
        if len(self.held) > KEEP:
            self.held.popitem(last=False)
        return {"changed": True}

    async def stage(self, material: DeployedMaterial, op: object) -> dict[str, object]:
        return self._keep(material)

    async def promote(self, material: DeployedMaterial, op: object) -> dict[str, object]:
        return {"changed": True}

    async def rollback(self, previous: DeployedMaterial, op: object) -> dict[str, object]:
        return self._keep(previous)

    async def read_back(self, *, staged: bool = False) -> DeployedMaterial:
        return self.held[self.credential]


class NullConfig(TargetConfig):
    #: The managed credential the target reads back for.
    credential: str


class NullPlugin:
    """The ``null`` target type: a :class:`NullTarget` per credential."""

    type = "null"
    description = "writes nothing; reads back what was last deployed"
    config_model = NullConfig
    accepts = frozenset({"signing_key"})

    def build(self, config: TargetConfig, services: Services) -> NullTarget:
        assert isinstance(config, NullConfig)
        return NullTarget(config.credential)


REGISTRY = Registry.of(kinds=[SERVICE_ACCOUNT], targets=[NullPlugin()])


class BenchServices:
    """What the composition root gives the engine, for the bench: every credential is a
    service account at the instant provider with one null target."""

    def __init__(self) -> None:
        self._configs: OrderedDict[str, CredentialConfig] = OrderedDict()

    def credential_config(self, name: str) -> CredentialConfig:
        cfg = self._configs.get(name)
        if cfg is None:
            cfg = self._configs[name] = SigningKeyConfig(
                kind="service_account",
                provider="bench",
                targets=[NullConfig(type="null", credential=name)],
            )
            if len(self._configs) > KEEP:
                self._configs.popitem(last=False)
        return cfg

    async def provider_session(
        self,
        factory: Callable[[ProviderAccess], S],
        credential: str,
        *,
        with_key: bool = False,
        fence: Fence | None = None,
    ) -> S:
        """The instant provider, whatever the kind asked for (the bench rotates service
        accounts only)."""
        return cast(S, InstantProvider(credential, fence))

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def algorithm_of(self, private_pem: bytes) -> str:
        return CryptoKeys().algorithm_of(private_pem)


def main() -> None:
    url, concurrency, log_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # JSON lines, as `keyturn --log-format json worker` writes them (to a file, not a pipe).
    log_stream = Path(log_file).open("a", buffering=1)  # noqa: SIM115 (process lifetime)
    sys.stderr = log_stream
    logs.configure("json", os.environ.get("BENCH_LOG_LEVEL", "info"))
    key = parse_master_key(os.environ["BENCH_MASTER_KEY"], "environment variable BENCH_MASTER_KEY")
    store = SqlStore(url)
    deps = EngineDeps(
        store=store,
        vault=AesGcmVault(key),
        keys=CryptoKeys(),
        clock=SystemClock(),
        services=BenchServices(),
        settings=EngineSettings(
            poll_seconds=float(os.environ.get("BENCH_POLL_SECONDS", "1.0")),
        ),
        registry=REGISTRY,
    )
    runner = Worker(deps, concurrency=concurrency)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.stop)
        await runner.run()

    profile_to = os.environ.get("BENCH_PROFILE")  # a directory: cProfile stats per worker
    profiler = cProfile.Profile() if profile_to else None
    try:
        if profiler is not None:
            profiler.enable()
        asyncio.run(go())
    finally:
        if profiler is not None and profile_to:
            profiler.disable()
            profiler.dump_stats(str(Path(profile_to) / f"worker-{os.getpid()}.prof"))
        store.close()
        structlog.get_logger("bench").info("bench worker exit", completed=runner.completed)


if __name__ == "__main__":
    main()

"""Test doubles of what the composition root gives the engine: a :class:`FakeServices` with
fixed credential configurations and provider sessions, and a registry of the built-in kinds,
targets and probes (as `keyturn` discovers them through entry points)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from keyturn.adapters.keys import CryptoKeys
from keyturn.domain.errors import KeyturnError
from keyturn.engine.registry import Registry
from keyturn.engine.spi import CredentialConfig, ProviderAccess, TargetPlugin
from keyturn.kinds.signing_key import PAT, SERVICE_ACCOUNT
from keyturn.kinds.webhook import WEBHOOK
from keyturn.ports import Fence
from keyturn.targets.files import FILE, SECRETS_FILE
from keyturn.targets.receiver import RECEIVER

T = TypeVar("T")
S = TypeVar("S")


def builtin_registry(*extra_targets: TargetPlugin) -> Registry:
    """The built-in plugins (and any test targets)."""
    return Registry.of(
        kinds=[SERVICE_ACCOUNT, PAT, WEBHOOK],
        targets=[FILE, SECRETS_FILE, *extra_targets],
        probes=[RECEIVER],
    )


@dataclass
class FakeServices:
    """The Services protocol over fixed parts: `configs` by credential name; a provider
    session is what `sessions(credential)` gives (e.g. one FakeKeyProvider), whatever factory
    the kind asked with."""

    configs: dict[str, CredentialConfig] = field(default_factory=dict)
    sessions: Callable[[str], Any] | None = None
    keys: CryptoKeys = field(default_factory=CryptoKeys)

    def credential_config(self, name: str) -> CredentialConfig:
        try:
            return self.configs[name]
        except KeyError:
            raise KeyturnError(f"credential {name} has no [credentials.{name}] section") from None

    async def provider_session(
        self,
        factory: Callable[[ProviderAccess], S],
        credential: str,
        *,
        with_key: bool = False,
        fence: Fence | None = None,
    ) -> S:
        if self.sessions is None:
            raise KeyturnError(f"credential {credential}: no provider session configured here")
        return cast(S, self.sessions(credential))

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def algorithm_of(self, private_pem: bytes) -> str:
        return self.keys.algorithm_of(private_pem)

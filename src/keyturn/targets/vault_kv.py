"""The ``vault_kv`` deploy target: a signing key in a KV version 2 engine of HashiCorp Vault or
OpenBao, staged on a pending path and promoted to the path holders read (see
:mod:`keyturn.adapters.kv`). The adapter's calls block; they run in keyturn's bounded thread
pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keyturn.adapters.kv import KvSettings, KvTarget
from keyturn.plugin import DeployedMaterial, Detail, KeyTarget, Services, TargetConfig, TargetOp


class VaultKvConfig(TargetConfig, KvSettings):
    """``[[credentials.NAME.targets]]`` with ``type = "vault_kv"``: url, mount, path,
    pending_path, namespace, timeout_seconds, adopt and the login (auth = "token" with token_env
    or token_file; auth = "approle" with role_id and secret_id_env or secret_id_file)."""


class VaultKv:
    """The async face of :class:`KvTarget` (the signing-key target cycle)."""

    def __init__(self, target: KvTarget, services: Services) -> None:
        self._target = target
        self._services = services
        self.name = target.name

    async def stage(self, material: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._services.blocking(
            self._target.stage, material, op.credential, op.rotation_id
        )

    async def read_back(self, *, staged: bool = False) -> DeployedMaterial:
        return await self._services.blocking(self._target.read_back, staged)

    async def promote(self, material: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._services.blocking(
            self._target.promote, material, op.credential, op.rotation_id
        )

    async def rollback(self, previous: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._services.blocking(
            self._target.rollback, previous, op.credential, op.rotation_id
        )


class VaultKvPlugin:
    type = "vault_kv"
    description = (
        "a HashiCorp Vault / OpenBao KV v2 path (signing keys; staged on a pending path, "
        "promoted as a new version)"
    )
    config_model = VaultKvConfig
    accepts = frozenset({"signing_key"})

    def build(self, config: TargetConfig, services: Services) -> VaultKv:
        assert isinstance(config, VaultKvConfig)
        name = config.name or config.default_name()
        return VaultKv(KvTarget(name, config), services)


VAULT_KV = VaultKvPlugin()

if TYPE_CHECKING:
    # mypy checks that the target satisfies the signing-key target protocol.
    _protocol_check: type[KeyTarget] = VaultKv

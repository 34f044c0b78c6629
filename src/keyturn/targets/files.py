"""Deploy targets on the local filesystem: ``file`` (a directory holding a signing key and its
credential ids) and ``secrets_file`` (the JSON file of webhook secrets a receiver accepts).
Their writes are blocking; they run in keyturn's bounded thread pool."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from keyturn.plugin import DeployedMaterial, Detail, Services, TargetConfig, TargetOp

if TYPE_CHECKING:  # the adapters (cryptography, httpx) load when a target is built
    from keyturn.adapters.deploy import FileTarget
    from keyturn.adapters.secrets_file import WebhookSecretsFileTarget


class PathConfig(TargetConfig):
    path: Path


class FileConfig(PathConfig):
    #: Take over a directory holding files keyturn did not write.
    adopt: bool = False


class KeyFiles:
    """A signing key and its credential ids as two files in a directory, in versions (see
    :class:`keyturn.adapters.deploy.FileTarget`): stage writes a version, promote swaps the
    ``current`` symlink, rollback swaps it back."""

    def __init__(self, target: FileTarget, services: Services) -> None:
        self._target = target
        self._services = services
        self.name = target.name

    async def stage(self, material: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._services.blocking(self._target.stage, material, op.credential)

    async def promote(self, material: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._services.blocking(self._target.promote, material)

    async def rollback(self, previous: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._services.blocking(self._target.rollback, previous, op.credential)

    async def read_back(self, *, staged: bool = False) -> DeployedMaterial:
        return await self._services.blocking(partial(self._target.read_back, staged=staged))


class SecretsFile:
    """The set of webhook secrets a receiver accepts, as one JSON file."""

    def __init__(self, target: WebhookSecretsFileTarget, services: Services) -> None:
        self._target = target
        self._services = services
        self.name = target.name

    async def deploy(self, secrets: Sequence[str]) -> str:
        return await self._services.blocking(self._target.deploy, secrets)

    async def read_back(self) -> tuple[str, tuple[str, ...]]:
        return await self._services.blocking(self._target.read_back)


class FilePlugin:
    type = "file"
    description = (
        "a directory receiving private_key.pem and credential.json (signing keys), in versions"
    )
    config_model = FileConfig
    accepts = frozenset({"signing_key"})

    def build(self, config: TargetConfig, services: Services) -> KeyFiles:
        from keyturn.adapters.deploy import FileTarget

        assert isinstance(config, PathConfig)
        name = config.name or f"file:{config.path}"
        adopt = isinstance(config, FileConfig) and config.adopt
        return KeyFiles(FileTarget(name, config.path, adopt=adopt), services)


class SecretsFilePlugin:
    type = "secrets_file"
    description = "a JSON file listing the webhook secrets a receiver accepts"
    config_model = PathConfig
    accepts = frozenset({"secret_set"})

    def build(self, config: TargetConfig, services: Services) -> SecretsFile:
        from keyturn.adapters.secrets_file import WebhookSecretsFileTarget

        assert isinstance(config, PathConfig)
        name = config.name or f"secrets_file:{config.path}"
        return SecretsFile(WebhookSecretsFileTarget(name, config.path), services)


FILE = FilePlugin()
SECRETS_FILE = SecretsFilePlugin()

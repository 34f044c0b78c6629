"""The ``aws_secrets_manager`` deploy target: a signing key and its credential ids as keyturn's
JSON key document in one AWS Secrets Manager secret, staged as AWSPENDING and promoted to
AWSCURRENT (see :mod:`keyturn.adapters.aws_secrets`). boto3 is blocking; every call runs in
keyturn's bounded thread pool. It needs the ``aws`` extra (``pip install 'keyturn[aws]'``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keyturn.adapters.aws_secrets import AwsSecretsManagerTarget
from keyturn.plugin import DeployedMaterial, Detail, Services, TargetConfig, TargetOp

if TYPE_CHECKING:
    from keyturn.plugin import KeyTarget


class AwsSecretsManagerConfig(TargetConfig):
    #: The secret's name (created when missing) or ARN (must exist).
    secret_id: str
    region: str = "us-east-1"
    #: Another endpoint (moto, LocalStack, a VPC endpoint); None: AWS's own for the region.
    endpoint_url: str | None = None
    #: Take over a secret keyturn did not create (it is tagged managed-by=keyturn).
    adopt: bool = False
    #: The KMS key a secret keyturn creates is encrypted with; None: aws/secretsmanager.
    kms_key_id: str | None = None


class AwsSecretsManager:
    """The async target (a :class:`KeyTarget`) over the synchronous adapter."""

    def __init__(self, target: AwsSecretsManagerTarget, services: Services) -> None:
        self._target = target
        self._services = services
        self.name = target.name

    async def stage(self, material: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._services.blocking(
            self._target.stage, material, op.rotation_id, op.credential
        )

    async def read_back(self, *, staged: bool = False) -> DeployedMaterial:
        return await self._services.blocking(self._target.read_back, staged)

    async def promote(self, material: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._services.blocking(
            self._target.promote, material, op.rotation_id, op.credential
        )

    async def rollback(self, previous: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._services.blocking(
            self._target.rollback, previous, op.rotation_id, op.credential
        )


class AwsSecretsManagerPlugin:
    type = "aws_secrets_manager"
    description = "an AWS Secrets Manager secret (staged as AWSPENDING, promoted to AWSCURRENT)"
    config_model = AwsSecretsManagerConfig
    accepts = frozenset({"signing_key"})

    def build(self, config: TargetConfig, services: Services) -> AwsSecretsManager:
        assert isinstance(config, AwsSecretsManagerConfig)
        target = AwsSecretsManagerTarget(
            config.name or f"aws_secrets_manager:{config.secret_id}",
            config.secret_id,
            region=config.region,
            endpoint_url=config.endpoint_url,
            adopt=config.adopt,
            kms_key_id=config.kms_key_id,
        )
        return AwsSecretsManager(target, services)


AWS_SECRETS_MANAGER = AwsSecretsManagerPlugin()

if TYPE_CHECKING:

    def _is_a_key_target(target: AwsSecretsManager) -> KeyTarget:
        return target  # mypy checks AwsSecretsManager against the KeyTarget protocol

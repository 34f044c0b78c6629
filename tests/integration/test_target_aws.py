"""The aws_secrets_manager target against a real moto server (a subprocess on a free port).

moto is not AWS: it overwrites a version when a ClientRequestToken is reused with other content
(AWS refuses); the tests check that keyturn refuses that itself. Dummy AWS credentials are set
in this process's environment only (the boto3 credential chain the target uses), never
printed; the moto server runs without them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from moto_fixture import INSTALL_HINT, MotoServer, start_moto

from keyturn.adapters.aws_secrets import AwsSecretsManagerTarget
from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.material import material_json, request_token
from keyturn.domain.errors import StepError
from keyturn.plugin import DeployedMaterial, TargetOp
from keyturn.targets.aws import AWS_SECRETS_MANAGER, AwsSecretsManager, AwsSecretsManagerConfig
from keyturn.testing.secret_scan import scan_bytes

CURRENT, PENDING, PREVIOUS = "AWSCURRENT", "AWSPENDING", "AWSPREVIOUS"


# ------------------------------------------------------------------------------- moto server


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    try:
        import boto3  # noqa: F401
    except ImportError:
        pytest.fail(f"boto3 is not installed; {INSTALL_HINT}", pytrace=False)
    directory = tmp_path_factory.mktemp("moto")
    server = start_moto(directory)
    with pytest.MonkeyPatch.context() as env:
        # The standard credential chain finds these (this process only); no profile, no IMDS.
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        env.setenv("AWS_CONFIG_FILE", str(directory / "no-config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(directory / "no-credentials"))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def aws(moto: MotoServer) -> Any:
    """A client for the tests' own looks at the server."""
    import boto3

    return boto3.session.Session(region_name="us-east-1").client(
        "secretsmanager", endpoint_url=moto.url
    )


# ---------------------------------------------------------------------------------- helpers


class Services:
    """What the target uses of keyturn's services: the thread pool."""

    async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)


KEYS = CryptoKeys()


def new_material() -> DeployedMaterial:
    key = KEYS.generate("ed25519")
    return DeployedMaterial(key.private_pem, f"Cr-{uuid.uuid4().hex[:12]}", str(uuid.uuid4()))


def secret_name() -> str:
    return f"keyturn-test/{uuid.uuid4().hex}"


def op(rotation: str, phase: str = "stage", credential: str = "svc") -> TargetOp:
    return TargetOp(rotation_id=rotation, credential=credential, phase=phase)


def target(moto: MotoServer, secret_id: str, **config: Any) -> AwsSecretsManager:
    built = AWS_SECRETS_MANAGER.build(
        AwsSecretsManagerConfig(
            type="aws_secrets_manager", secret_id=secret_id, endpoint_url=moto.url, **config
        ),
        Services(),  # type: ignore[arg-type]
    )
    assert isinstance(built, AwsSecretsManager)
    return built


def labels(aws: Any, secret_id: str) -> dict[str, list[str]]:
    """Version id -> its labels (versions without one left out, as AWS does)."""
    stages = aws.describe_secret(SecretId=secret_id).get("VersionIdsToStages") or {}
    return {v: sorted(s) for v, s in stages.items() if s}


def version_with(aws: Any, secret_id: str, label: str) -> str:
    holders = [v for v, s in labels(aws, secret_id).items() if label in s]
    assert len(holders) == 1, (label, labels(aws, secret_id))
    return holders[0]


def content(aws: Any, secret_id: str, version_id: str) -> str:
    return str(aws.get_secret_value(SecretId=secret_id, VersionId=version_id)["SecretString"])


def held(aws: Any, secret_id: str, label: str) -> str:
    return content(aws, secret_id, version_with(aws, secret_id, label))


def version_count(aws: Any, secret_id: str) -> int:
    found = aws.list_secret_version_ids(SecretId=secret_id, IncludeDeprecated=True)
    return len(found["Versions"])


def tags(aws: Any, secret_id: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in aws.describe_secret(SecretId=secret_id).get("Tags", [])}


def assert_no_secrets(text: str, *materials: DeployedMaterial) -> None:
    assert "PRIVATE KEY" not in text
    found = scan_bytes(text, {f"key {i}": m.private_key_pem for i, m in enumerate(materials)})
    assert not found, [str(f) for f in found]


def snapshot(aws: Any, secret_id: str) -> tuple[int, dict[str, list[str]]]:
    return version_count(aws, secret_id), labels(aws, secret_id)


async def established(moto: MotoServer, secret_id: str, material: DeployedMaterial) -> None:
    """A secret keyturn created whose AWSCURRENT holds `material` (an earlier rotation)."""
    t = target(moto, secret_id)
    first = f"r-{uuid.uuid4().hex}"
    await t.stage(material, op(first))
    await t.promote(material, op(first, "promote"))


# ------------------------------------------------------------------------------------ cycle


@pytest.mark.anyio
async def test_the_cycle_stage_promote_rollback_each_idempotent(moto: MotoServer, aws: Any) -> None:
    name = secret_name()
    old, new = new_material(), new_material()
    await established(moto, name, old)
    old_version = version_with(aws, name, CURRENT)
    assert version_count(aws, name) == 1
    t = target(moto, name)
    rotation = f"r-{uuid.uuid4().hex}"

    # stage: AWSCURRENT keeps the old content, AWSPENDING holds the new one
    staged = await t.stage(new, op(rotation))
    token = request_token(rotation, "stage")
    assert staged == {"changed": True, "version_id": token, "stage": PENDING}
    assert held(aws, name, CURRENT) == material_json(old)
    assert held(aws, name, PENDING) == material_json(new)
    assert version_with(aws, name, PENDING) == token
    assert (await t.read_back(staged=True)) == new
    assert (await t.read_back()) == old
    before = snapshot(aws, name)
    assert before[0] == 2
    again = await t.stage(new, op(rotation))
    assert again["changed"] is False
    assert snapshot(aws, name) == before

    # promote: AWSCURRENT new, AWSPREVIOUS old, AWSPENDING gone
    promoted = await t.promote(new, op(rotation, "promote"))
    assert promoted == {"changed": True, "version_id": token, "stage": CURRENT}
    assert labels(aws, name) == {token: [CURRENT], old_version: [PREVIOUS]}
    assert (await t.read_back()) == new
    after_promote = snapshot(aws, name)
    assert (await t.promote(new, op(rotation, "promote")))["changed"] is False
    assert (await t.stage(new, op(rotation)))["changed"] is False  # a stage retried late
    assert snapshot(aws, name) == after_promote

    # rollback: AWSCURRENT back on the old version (no new version)
    rolled = await t.rollback(old, op(rotation, "rollback"))
    assert rolled == {"changed": True, "version_id": old_version, "stage": CURRENT}
    assert labels(aws, name) == {old_version: [CURRENT], token: [PREVIOUS]}
    assert (await t.read_back()) == old
    after_rollback = snapshot(aws, name)
    assert (await t.rollback(old, op(rotation, "rollback")))["changed"] is False
    assert snapshot(aws, name) == after_rollback
    assert after_rollback[0] == 2  # one version per rotation: the old one and this rotation's

    for detail in (staged, again, promoted, rolled):
        assert_no_secrets(json.dumps(detail), old, new)


@pytest.mark.anyio
async def test_creation_from_nothing(moto: MotoServer, aws: Any) -> None:
    name = secret_name()
    new = new_material()
    t = target(moto, name)
    rotation = f"r-{uuid.uuid4().hex}"
    with pytest.raises(StepError) as nothing:
        await t.read_back()
    assert str(nothing.value).startswith(f"target aws_secrets_manager:{name}:")
    assert nothing.value.retryable is False

    staged = await t.stage(new, op(rotation, credential="svc-a"))
    assert staged["changed"] is True and staged["created"] is True
    assert tags(aws, name) == {"managed-by": "keyturn", "keyturn-credential": "svc-a"}
    token = request_token(rotation, "stage")
    # The first version of a secret is AWSCURRENT as well, whatever PutSecretValue asks (AWS
    # documents it; moto does the same): nothing else was current before.
    assert labels(aws, name) == {token: [CURRENT, PENDING]}
    assert (await t.read_back(staged=True)) == new
    assert (await t.stage(new, op(rotation, credential="svc-a")))["changed"] is False

    promoted = await t.promote(new, op(rotation, "promote", credential="svc-a"))
    assert promoted == {"changed": True, "version_id": token, "stage": CURRENT}
    assert labels(aws, name) == {token: [CURRENT]}
    assert (await t.promote(new, op(rotation, "promote", credential="svc-a")))["changed"] is False
    assert version_count(aws, name) == 1


@pytest.mark.anyio
async def test_rollback_writes_the_previous_material_only_when_no_version_holds_it(
    moto: MotoServer, aws: Any
) -> None:
    name = secret_name()
    old, new = new_material(), new_material()
    t = target(moto, name)
    rotation = f"r-{uuid.uuid4().hex}"
    await t.stage(new, op(rotation))  # a fresh secret: the new key is its only version
    rolled = await t.rollback(old, op(rotation, "rollback"))
    token = request_token(rotation, "rollback")
    assert rolled == {"changed": True, "version_id": token, "stage": CURRENT}
    assert (await t.read_back()) == old
    assert labels(aws, name) == {token: [CURRENT], request_token(rotation, "stage"): [PREVIOUS]}
    before = snapshot(aws, name)
    assert before[0] == 2
    assert (await t.rollback(old, op(rotation, "rollback")))["changed"] is False
    assert snapshot(aws, name) == before

    # The rollback's version is never rewritten with other content.
    other = new_material()
    with pytest.raises(StepError, match="never rewrites a version") as refused:
        await t.rollback(other, op(rotation, "rollback"))
    assert refused.value.retryable is False
    assert_no_secrets(str(refused.value), old, new, other)
    assert snapshot(aws, name) == before


@pytest.mark.anyio
async def test_rollback_finds_an_older_version_without_a_label(moto: MotoServer, aws: Any) -> None:
    name = secret_name()
    first, second, third = new_material(), new_material(), new_material()
    await established(moto, name, first)
    first_version = version_with(aws, name, CURRENT)
    await established(moto, name, second)
    await established(moto, name, third)
    assert first_version not in labels(aws, name)  # neither current nor previous any more
    before = version_count(aws, name)
    rolled = await target(moto, name).rollback(first, op(f"r-{uuid.uuid4().hex}", "rollback"))
    assert rolled == {"changed": True, "version_id": first_version, "stage": CURRENT}
    assert version_count(aws, name) == before == 3
    assert held(aws, name, CURRENT) == material_json(first)


# ---------------------------------------------------------------------------------- refusals


@pytest.mark.anyio
async def test_other_content_under_the_same_rotation_token_is_refused(
    moto: MotoServer, aws: Any
) -> None:
    name = secret_name()
    old, new, other = new_material(), new_material(), new_material()
    await established(moto, name, old)
    t = target(moto, name)
    rotation = f"r-{uuid.uuid4().hex}"
    await t.stage(new, op(rotation))
    before = snapshot(aws, name)

    # moto would overwrite the version; keyturn must not ask it to.
    with pytest.raises(StepError) as refused:
        await t.stage(other, op(rotation))
    assert refused.value.retryable is False
    assert str(refused.value).startswith(f"target aws_secrets_manager:{name}:")
    assert "holds other material" in str(refused.value)
    assert_no_secrets(str(refused.value), old, new, other)
    assert snapshot(aws, name) == before
    assert content(aws, name, request_token(rotation, "stage")) == material_json(new)

    with pytest.raises(StepError) as wrong_promote:
        await t.promote(other, op(rotation, "promote"))
    assert wrong_promote.value.retryable is False
    assert_no_secrets(str(wrong_promote.value), old, new, other)
    assert snapshot(aws, name) == before
    assert (await t.read_back()) == old


@pytest.mark.anyio
async def test_promote_needs_this_rotations_stage(moto: MotoServer, aws: Any) -> None:
    name = secret_name()
    old, first, second = new_material(), new_material(), new_material()
    await established(moto, name, old)
    t = target(moto, name)
    with pytest.raises(StepError, match="nothing is staged") as unstaged:
        await t.promote(first, op("r-never-staged", "promote"))
    assert unstaged.value.retryable is False

    # Another rotation staged after this one: AWSPENDING is not this rotation's any more.
    await t.stage(first, op("r-first"))
    await t.stage(second, op("r-second"))
    assert version_with(aws, name, PENDING) == request_token("r-second", "stage")
    before = snapshot(aws, name)
    with pytest.raises(StepError, match="another writer") as moved:
        await t.promote(first, op("r-first", "promote"))
    assert moved.value.retryable is False
    assert snapshot(aws, name) == before
    assert (await t.read_back()) == old

    # The first rotation staged again: its version is labelled AWSPENDING again, not rewritten.
    restaged = await t.stage(first, op("r-first"))
    assert restaged == {
        "changed": True,
        "version_id": request_token("r-first", "stage"),
        "stage": PENDING,
    }
    assert version_count(aws, name) == before[0]
    assert (await t.read_back(staged=True)) == first
    assert (await t.promote(first, op("r-first", "promote")))["changed"] is True
    assert (await t.read_back()) == first


@pytest.mark.anyio
async def test_a_secret_keyturn_did_not_create_is_refused_unless_adopted(
    moto: MotoServer, aws: Any
) -> None:
    name = secret_name()
    theirs, new = new_material(), new_material()
    aws.create_secret(
        Name=name, SecretString=material_json(theirs), Tags=[{"Key": "team", "Value": "x"}]
    )
    rotation = f"r-{uuid.uuid4().hex}"
    before = snapshot(aws, name)

    with pytest.raises(StepError) as refused:
        await target(moto, name).stage(new, op(rotation, credential="svc-b"))
    message = str(refused.value)
    assert refused.value.retryable is False
    assert message.startswith(f"target aws_secrets_manager:{name}:")
    assert "set adopt = true in its [[credentials.svc-b.targets]] table" in message
    assert "\n" not in message
    assert_no_secrets(message, theirs, new)
    assert snapshot(aws, name) == before
    assert tags(aws, name) == {"team": "x"}
    with pytest.raises(StepError, match="adopt = true"):
        await target(moto, name).rollback(new, op(rotation, "rollback", credential="svc-b"))
    assert snapshot(aws, name) == before

    adopted = target(moto, name, adopt=True)
    staged = await adopted.stage(new, op(rotation, credential="svc-b"))
    assert staged["changed"] is True and staged["adopted"] is True
    assert tags(aws, name) == {"team": "x", "managed-by": "keyturn", "keyturn-credential": "svc-b"}
    assert (await adopted.read_back()) == theirs
    assert (await adopted.read_back(staged=True)) == new
    # Tagged now: without adopt it is keyturn's for svc-b, and for svc-b only.
    assert (await target(moto, name).stage(new, op(rotation, credential="svc-b")))[
        "changed"
    ] is False
    with pytest.raises(StepError, match="managed by keyturn for credential svc-b"):
        await target(moto, name).stage(new, op(rotation, credential="svc-c"))


@pytest.mark.anyio
async def test_a_secret_scheduled_for_deletion_is_refused(moto: MotoServer, aws: Any) -> None:
    name = secret_name()
    old, new = new_material(), new_material()
    await established(moto, name, old)
    aws.delete_secret(SecretId=name, RecoveryWindowInDays=7)
    before = version_count(aws, name)
    with pytest.raises(StepError) as refused:
        await target(moto, name).stage(new, op(f"r-{uuid.uuid4().hex}"))
    assert refused.value.retryable is False
    # keyturn's own refusal, before any call fails (not an AWS error code passed on)
    assert f"secret {name} is scheduled for deletion; restore it" in str(refused.value)
    assert version_count(aws, name) == before


# ------------------------------------------------------------------------------------ errors


@pytest.mark.anyio
async def test_a_stopped_server_is_a_retryable_error_naming_the_target(
    moto: MotoServer, tmp_path: Path
) -> None:
    server = start_moto(tmp_path)
    try:
        old, new = new_material(), new_material()
        name = secret_name()
        t = AWS_SECRETS_MANAGER.build(
            AwsSecretsManagerConfig(
                type="aws_secrets_manager",
                name="app-signing-key",
                secret_id=name,
                endpoint_url=server.url,
            ),
            Services(),  # type: ignore[arg-type]
        )
        rotation = f"r-{uuid.uuid4().hex}"
        await t.stage(old, op(rotation))
    finally:
        server.stop()
    calls = [
        t.stage(new, op(rotation)),
        t.read_back(),
        t.promote(old, op(rotation, "promote")),
        t.rollback(old, op(rotation, "rollback")),
    ]
    started = time.monotonic()
    for call in calls:
        with pytest.raises(StepError) as unreachable:
            await call
        message = str(unreachable.value)
        assert unreachable.value.retryable is True
        assert message.startswith("target app-signing-key:")
        assert "cannot be reached" in message
        assert_no_secrets(message, old, new)
    assert time.monotonic() - started < 30


class _Client:
    """A secretsmanager client for an empty keyturn secret whose writes fail with `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def describe_secret(self, **_: Any) -> dict[str, Any]:
        return {
            "Tags": [
                {"Key": "managed-by", "Value": "keyturn"},
                {"Key": "keyturn-credential", "Value": "svc"},
            ]
        }

    def get_secret_value(self, **_: Any) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        raise ClientError(
            {"Error": {"Code": "ResourceNotFoundException", "Message": "none"}}, "GetSecretValue"
        )

    def put_secret_value(self, **kwargs: Any) -> dict[str, Any]:
        raise self.error


def _echoing_errors(secret_string: str) -> list[tuple[Exception, bool, str]]:
    """botocore errors whose text quotes the request (the SecretString), as some do; whether
    each is retryable and what the message must say."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        ParamValidationError,
        ReadTimeoutError,
    )

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": f"bad SecretString {secret_string}"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "PutSecretValue",
        )

    return [
        (client_error("AccessDeniedException", 400), False, "secretsmanager:PutSecretValue"),
        (client_error("ValidationException", 400), False, "(ValidationException, HTTP 400)"),
        (client_error("ResourceExistsException", 400), False, "ResourceExistsException"),
        (client_error("ThrottlingException", 400), True, "ThrottlingException"),
        (client_error("InternalServiceError", 500), True, "HTTP 500"),
        (client_error("UnrecognizedClientException", 400), False, "credentials"),
        (
            ParamValidationError(report=f"Invalid SecretString, value: {secret_string}"),
            False,
            "ParamValidationError",
        ),
        (
            EndpointConnectionError(endpoint_url=f"http://x/{secret_string}"),
            True,
            "cannot be reached",
        ),
        (ReadTimeoutError(endpoint_url=f"http://x/{secret_string}"), True, "cannot be reached"),
    ]


def test_no_error_message_holds_the_key_even_when_botocore_echoes_it() -> None:
    material = new_material()
    document = material_json(material)
    cases = _echoing_errors(document)
    for error, retryable, says in cases:
        assert scan_bytes(str(error), {"key": material.private_key_pem})  # it does quote it
        target = AwsSecretsManagerTarget(
            "aws:unit", "unit-secret", client_factory=lambda error=error: _Client(error)
        )
        with pytest.raises(StepError) as caught:
            target.stage(material, "r-unit", "svc")
        message = str(caught.value)
        assert message.startswith("target aws:unit: PutSecretValue on secret unit-secret failed")
        assert says in message, message
        assert caught.value.retryable is retryable, message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        assert_no_secrets(message, material)
        assert "credential_id" not in message and material.credential_uuid not in message


def test_config_and_name() -> None:
    config = AWS_SECRETS_MANAGER.config_model.model_validate(
        {"type": "aws_secrets_manager", "secret_id": "prod/app/signing-key"}
    )
    assert isinstance(config, AwsSecretsManagerConfig)
    assert (config.region, config.endpoint_url, config.adopt, config.kms_key_id) == (
        "us-east-1",
        None,
        False,
        None,
    )
    built = AWS_SECRETS_MANAGER.build(config, Services())  # type: ignore[arg-type]
    assert built.name == "aws_secrets_manager:prod/app/signing-key"
    assert AWS_SECRETS_MANAGER.accepts == frozenset({"signing_key"})
    with pytest.raises(Exception, match="secret_id"):
        AWS_SECRETS_MANAGER.config_model.model_validate({"type": "aws_secrets_manager"})

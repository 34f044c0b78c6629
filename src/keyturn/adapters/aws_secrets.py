"""The AWS Secrets Manager deploy target: one secret holding keyturn's JSON key document
(:mod:`keyturn.adapters.material`), rotated through Secrets Manager's staging labels.

- ``stage``: the new material becomes a version labelled AWSPENDING; holders (who read
  AWSCURRENT) do not see it. The version id is the rotation's request token, so a repeated
  stage writes nothing. A secret that does not exist is created without a value and tagged
  ``managed-by=keyturn`` and ``keyturn-credential=<credential>``; one without the tag is
  refused unless ``adopt``. AWS (and moto) label the *first* version of a secret AWSCURRENT
  as well, whatever the call asks: a secret created by stage is current at once.
- ``read_back``: the AWSCURRENT (or AWSPENDING) version, always asked for by label.
- ``promote``: AWSCURRENT moves to the staged version (Secrets Manager moves AWSPREVIOUS to
  the version it left), then AWSPENDING is removed from it.
- ``rollback``: AWSCURRENT moves back to a version holding the previous material (AWSPREVIOUS
  first); only when none does is it written again, as a new version.

Nothing is ever deleted and unchanged content never makes a new version. The client is
synchronous (boto3); the target plugin runs it in keyturn's thread pool. Errors are
:class:`StepError` starting with ``target <name>:``; they carry the AWS error code and
operation, never an exception's text (botocore can echo request parameters, the SecretString
among them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

from keyturn.adapters.material import (
    CREDENTIAL_KEY,
    MANAGED_BY,
    MANAGED_BY_KEY,
    material_from_document,
    material_json,
    request_token,
    same_material,
)
from keyturn.domain.errors import ConfigError, KeyturnError, StepError
from keyturn.ports import DeployedMaterial

CURRENT: Final = "AWSCURRENT"
PENDING: Final = "AWSPENDING"
PREVIOUS: Final = "AWSPREVIOUS"

_NOT_FOUND: Final = "ResourceNotFoundException"
_RETRYABLE_CODES: Final = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "InternalServiceError",
        "InternalServiceErrorException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_CREDENTIAL_CODES: Final = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "ExpiredTokenException",
        "ExpiredToken",
        "IncompleteSignature",
    }
)
_CREDENTIALS_HINT: Final = (
    "check the AWS credentials boto3 finds (AWS_PROFILE, AWS_ACCESS_KEY_ID, an instance or "
    "task role) and that they are for this account"
)


def boto3_installed() -> bool:
    return importlib.util.find_spec("boto3") is not None


#: Connections a shared client keeps open to one endpoint: at least as many as keyturn's
#: plugin threads (the worker's concurrency) can use at once, so none is opened per call.
#: (botocore's default is 10; past the limit a connection is opened and closed per request.)
MAX_POOL_CONNECTIONS: Final = 256

#: One client per (process, region, endpoint): a boto3 session and client cost ~50 ms of CPU
#: and ~9 MB each (the endpoint and service models are parsed per session), so one per target
#: made a fleet's first stage CPU-bound and its memory grow with the number of targets.
#: boto3 clients are thread-safe (sessions are not: each is used once, under the lock).
_CLIENTS: dict[tuple[int, str, str | None], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _new_client(region: str, endpoint_url: str | None) -> Any:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=20,
        user_agent_extra="keyturn",
        max_pool_connections=MAX_POOL_CONNECTIONS,
    )
    # Credentials from boto3's standard chain (environment, profile, instance or task role).
    session = boto3.session.Session(region_name=region)
    return session.client("secretsmanager", endpoint_url=endpoint_url, config=config)


def _default_client(region: str, endpoint_url: str | None) -> Any:
    """The process's client for `region` and `endpoint_url`, made on first use."""
    key = (os.getpid(), region, endpoint_url)  # a forked child makes its own
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = _new_client(region, endpoint_url)
        return client


def _client_error_hint(code: str, operation: str) -> str:
    if code in ("AccessDeniedException", "AccessDenied"):
        return (
            f"the AWS identity may not call secretsmanager:{operation} on this secret; grant "
            "it (and kms:Decrypt / kms:GenerateDataKey when the secret uses a customer-managed "
            "KMS key)"
        )
    if code in _CREDENTIAL_CODES:
        return f"AWS refused the credentials; {_CREDENTIALS_HINT}"
    if code == _NOT_FOUND:
        return "the secret or version is gone; check secret_id and region, then run it again"
    if code in ("DecryptionFailure", "EncryptionFailure", "KMSInvalidStateException"):
        return "KMS refused the secret's key; check kms_key_id and the caller's KMS grants"
    if code == "InvalidRequestException":
        return (
            "the secret is in a state that refuses this (scheduled for deletion? restore it "
            "with `aws secretsmanager restore-secret`)"
        )
    if code in ("InvalidParameterException", "ValidationException"):
        return "AWS refused a parameter; check secret_id, region and kms_key_id in its table"
    if code == "ResourceExistsException":
        return "a version with this request token already holds other content"
    if code == "LimitExceededException":
        return "the secret reached an AWS quota (versions); old versions expire after 24 h"
    return "see the AWS Secrets Manager error code"


class AwsSecretsManagerTarget:
    """One secret in AWS Secrets Manager (`secret_id`: a name or an ARN) as a signing-key
    target. `client_factory` (tests) returns a boto3 ``secretsmanager`` client; by default the
    one client of the process for `region` and `endpoint_url` (every target with the same
    two shares it), made on first use with boto3's credential chain."""

    def __init__(
        self,
        name: str,
        secret_id: str,
        *,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        adopt: bool = False,
        kms_key_id: str | None = None,
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        if not secret_id.strip():
            raise ConfigError(f"target {name}: secret_id is empty; set the secret's name or ARN")
        if client_factory is None and not boto3_installed():
            raise ConfigError(
                f"target {name}: the aws_secrets_manager target needs boto3; "
                "pip install 'keyturn[aws]'"
            )
        self.name = name
        self.secret_id = secret_id
        self.region = region
        self.endpoint_url = endpoint_url
        self.adopt = adopt
        self.kms_key_id = kms_key_id
        self._factory = client_factory or (lambda: _default_client(region, endpoint_url))
        self._client_obj: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------- cycle

    def stage(
        self, material: DeployedMaterial, rotation_id: str, credential: str
    ) -> dict[str, Any]:
        """Write `material` as the AWSPENDING version (version id: the rotation's stage token)."""
        labels, extra = self._prepare(credential)
        current = labels.get(CURRENT)
        if current is not None and self._holds(current, material):
            return _detail(False, current, CURRENT, **extra)
        token = request_token(rotation_id, "stage")
        text = self._version_text(token)
        if text is not None:
            if not _same(text, material):
                raise self._refuse(
                    f"version {token} of secret {self.secret_id}, written for rotation "
                    f"{rotation_id}, holds other material; keyturn never rewrites a version "
                    "(roll this rotation back and start a new one)"
                )
            if labels.get(PENDING) == token:
                return _detail(False, token, PENDING, **extra)
            # Ours, but no longer labelled AWSPENDING (moved away since): label it again.
            self._move_label(PENDING, token, labels.get(PENDING))
            return _detail(True, token, PENDING, **extra)
        self._call(
            "PutSecretValue",
            self._client().put_secret_value,
            SecretId=self.secret_id,
            ClientRequestToken=token,
            SecretString=material_json(material),
            VersionStages=[PENDING],
        )
        return _detail(True, token, PENDING, **extra)

    def read_back(self, staged: bool = False) -> DeployedMaterial:
        """What holders load now (AWSCURRENT), or what stage wrote (AWSPENDING)."""
        label = PENDING if staged else CURRENT
        # Always by label: a read without one is not the current version everywhere (moto).
        response = self._call(
            "GetSecretValue",
            self._client().get_secret_value,
            missing_ok=True,
            SecretId=self.secret_id,
            VersionStage=label,
        )
        if response is None:
            raise self._refuse(
                f"secret {self.secret_id} has no {label} version (or does not exist); "
                + ("run stage first" if staged else "stage and promote a key to it first")
            )
        text = response.get("SecretString")
        if not isinstance(text, str):
            raise self._refuse(
                f"secret {self.secret_id} ({label}) holds binary data, not keyturn's JSON key "
                "document"
            )
        try:
            return material_from_document(
                text, f"target {self.name}: secret {self.secret_id} ({label})"
            )
        except KeyturnError as exc:
            raise StepError(str(exc), retryable=False) from None

    def promote(
        self, material: DeployedMaterial, rotation_id: str, credential: str
    ) -> dict[str, Any]:
        """Move AWSCURRENT to the version staged for `rotation_id` (it must hold `material`);
        the old one becomes AWSPREVIOUS; AWSPENDING is removed."""
        labels = self._existing(credential, "promote")
        current = labels.get(CURRENT)
        if current is not None and self._holds(current, material):
            # Already current; finish a promote cut short after the move (or a first version,
            # which AWS makes current at once).
            changed = self._drop_pending(labels, current)
            return _detail(changed, current, CURRENT)
        token = request_token(rotation_id, "stage")
        text = self._version_text(token)
        if text is None:
            raise self._refuse(
                f"nothing is staged for rotation {rotation_id} in secret {self.secret_id} "
                f"(no version {token}); run stage first"
            )
        if not _same(text, material):
            raise self._refuse(
                f"the version staged for rotation {rotation_id} ({token}) holds other material "
                "than promote was given; it is not promoted"
            )
        pending = labels.get(PENDING)
        if pending is not None and pending != token:
            raise self._refuse(
                f"AWSPENDING of secret {self.secret_id} is on version {pending}, not on the one "
                f"rotation {rotation_id} staged ({token}): another writer is rotating this "
                "secret; stop it (a Secrets Manager rotation function?) and stage again"
            )
        # Secrets Manager moves AWSPREVIOUS to the version AWSCURRENT leaves.
        self._move_label(CURRENT, token, current)
        self._drop_pending(self._labels_now(), token)
        return _detail(True, token, CURRENT)

    def rollback(
        self, previous: DeployedMaterial, rotation_id: str, credential: str
    ) -> dict[str, Any]:
        """Make `previous` the AWSCURRENT content again: move the label back to a version that
        holds it (AWSPREVIOUS first), or write it as a new version when none does."""
        labels, extra = self._prepare(credential)
        current = labels.get(CURRENT)
        staged = request_token(rotation_id, "stage")
        if current is not None and self._holds(current, previous):
            changed = self._drop_pending(labels, staged)
            return _detail(changed, current, CURRENT, **extra)
        token = request_token(rotation_id, "rollback")
        found = self._find(previous, labels)
        if found is not None:
            self._move_label(CURRENT, found, current)
        else:
            if self._version_text(token) is not None:
                raise self._refuse(
                    f"version {token} of secret {self.secret_id}, written by rollback of "
                    f"rotation {rotation_id}, holds other material; keyturn never rewrites a "
                    "version"
                )
            found = token
            self._call(
                "PutSecretValue",
                self._client().put_secret_value,
                SecretId=self.secret_id,
                ClientRequestToken=token,
                SecretString=material_json(previous),
                VersionStages=[CURRENT],
            )
        # Labels as they are now: servers differ in what a new AWSCURRENT does to the others.
        self._drop_pending(self._labels_now(), staged)
        return _detail(True, found, CURRENT, **extra)

    # ------------------------------------------------------------------------ the secret

    def _prepare(self, credential: str) -> tuple[dict[str, str], dict[str, Any]]:
        """The secret's labels (label -> version id), after creating it when it does not
        exist and checking (or, with adopt, setting) keyturn's mark; extra detail."""
        extra: dict[str, Any] = {}
        description = self._describe()
        if description is None:
            self._create(credential)
            extra["created"] = True
            description = self._describe()
            if description is None:
                raise self._refuse(
                    f"secret {self.secret_id} is not found right after creating it; check "
                    "region and endpoint_url in its table"
                )
        if self._check_mark(description, credential):
            extra["adopted"] = True
        return _labels(description), extra

    def _existing(self, credential: str, what: str) -> dict[str, str]:
        description = self._describe()
        if description is None:
            raise self._refuse(
                f"secret {self.secret_id} does not exist (deleted since stage?); check "
                f"secret_id and region, stage again, then {what}"
            )
        self._check_mark(description, credential)
        return _labels(description)

    def _labels_now(self) -> dict[str, str]:
        description = self._describe()
        return _labels(description) if description is not None else {}

    def _describe(self) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._call(
            "DescribeSecret",
            self._client().describe_secret,
            missing_ok=True,
            SecretId=self.secret_id,
        )
        return found

    def _create(self, credential: str) -> None:
        if self.secret_id.startswith("arn:"):
            raise self._refuse(
                f"secret {self.secret_id} does not exist and keyturn creates a secret from a "
                "name only; create it or set secret_id to a name"
            )
        kwargs: dict[str, Any] = {
            "Name": self.secret_id,
            # No value: a value given here would be the current version at once.
            "Description": f"signing key of keyturn credential {credential}",
            "Tags": _marks(credential),
        }
        if self.kms_key_id:
            kwargs["KmsKeyId"] = self.kms_key_id
        # Created meanwhile (or by an attempt whose answer was lost): its mark is checked next.
        with contextlib.suppress(_Exists):
            self._call("CreateSecret", self._client().create_secret, **kwargs)

    def _check_mark(self, description: dict[str, Any], credential: str) -> bool:
        """Refuse a secret keyturn does not manage for `credential`, unless adopt (then tag it:
        True). Refuse one scheduled for deletion."""
        if description.get("DeletedDate"):
            raise self._refuse(
                f"secret {self.secret_id} is scheduled for deletion; restore it (`aws "
                "secretsmanager restore-secret`) or set secret_id to another secret"
            )
        tags = {t.get("Key"): t.get("Value") for t in description.get("Tags") or ()}
        managed = tags.get(MANAGED_BY_KEY) == MANAGED_BY
        owner = tags.get(CREDENTIAL_KEY)
        if managed and owner == credential:
            return False
        if not self.adopt:
            what = (
                f"is managed by keyturn for credential {owner}"
                if managed and owner
                else f"was not created by keyturn (no tag {MANAGED_BY_KEY}={MANAGED_BY})"
            )
            raise self._refuse(
                f"secret {self.secret_id} {what}; set adopt = true in its "
                f"[[credentials.{credential}.targets]] table to let keyturn take it over"
            )
        self._call(
            "TagResource",
            self._client().tag_resource,
            SecretId=self.secret_id,
            Tags=_marks(credential),
        )
        return True

    # --------------------------------------------------------------------------- versions

    def _version_text(self, version_id: str) -> str | None:
        """The SecretString of a version ("" for a binary one), None when there is none."""
        response = self._call(
            "GetSecretValue",
            self._client().get_secret_value,
            missing_ok=True,
            SecretId=self.secret_id,
            VersionId=version_id,
        )
        if response is None:
            return None
        text = response.get("SecretString")
        return text if isinstance(text, str) else ""

    def _holds(self, version_id: str, material: DeployedMaterial) -> bool:
        text = self._version_text(version_id)
        return text is not None and _same(text, material)

    def _version_ids(self) -> Iterator[str]:
        kwargs: dict[str, Any] = {"SecretId": self.secret_id, "IncludeDeprecated": True}
        while True:
            page = self._call(
                "ListSecretVersionIds", self._client().list_secret_version_ids, **kwargs
            )
            for version in page.get("Versions") or ():
                yield version["VersionId"]
            if not page.get("NextToken"):
                return
            kwargs["NextToken"] = page["NextToken"]

    def _find(self, material: DeployedMaterial, labels: dict[str, str]) -> str | None:
        """A version other than the current one holding `material`, AWSPREVIOUS first."""
        current = labels.get(CURRENT)
        first = [labels[PREVIOUS]] if PREVIOUS in labels else []
        seen: set[str] = set()
        for version_id in (*first, *self._version_ids()):
            if version_id in seen or version_id == current:
                continue
            seen.add(version_id)
            if self._holds(version_id, material):
                return version_id
        return None

    def _move_label(self, label: str, to_version: str, from_version: str | None) -> None:
        kwargs: dict[str, Any] = {
            "SecretId": self.secret_id,
            "VersionStage": label,
            "MoveToVersionId": to_version,
        }
        if from_version is not None and from_version != to_version:
            kwargs["RemoveFromVersionId"] = from_version
        self._call("UpdateSecretVersionStage", self._client().update_secret_version_stage, **kwargs)

    def _drop_pending(self, labels: dict[str, str], version_id: str) -> bool:
        """Remove AWSPENDING from `version_id` if it carries it (True: removed)."""
        if labels.get(PENDING) != version_id:
            return False
        self._call(
            "UpdateSecretVersionStage",
            self._client().update_secret_version_stage,
            SecretId=self.secret_id,
            VersionStage=PENDING,
            RemoveFromVersionId=version_id,
        )
        return True

    # ----------------------------------------------------------------------------- calls

    def _client(self) -> Any:
        with self._lock:
            if self._client_obj is None:
                self._client_obj = self._factory()
            return self._client_obj

    def _refuse(self, message: str) -> StepError:
        return StepError(f"target {self.name}: {message}", retryable=False)

    def _call(
        self, operation: str, fn: Callable[..., Any], *, missing_ok: bool = False, **kwargs: Any
    ) -> Any:
        """`fn(**kwargs)`; botocore's errors as StepError (code and operation only). With
        `missing_ok`, None when AWS answers ResourceNotFoundException."""
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code, status = _code_and_status(exc)
            if missing_ok and code == _NOT_FOUND:
                return None
            op = str(getattr(exc, "operation_name", "") or operation)
            if code == "ResourceExistsException" and op == "CreateSecret":
                raise _Exists from None
            raise self._client_error(op, code, status) from None
        except BotoCoreError as exc:
            raise self._transport_error(operation, exc) from None

    def _client_error(self, operation: str, code: str, status: int) -> StepError:
        retryable = code in _RETRYABLE_CODES or status >= 500 or status == 429
        where = f"target {self.name}: {operation} on secret {self.secret_id} failed ({code}"
        where += f", HTTP {status})" if status else ")"
        if retryable:
            return StepError(f"{where}; AWS is throttling or unavailable, retried", retryable=True)
        return StepError(f"{where}; {_client_error_hint(code, operation)}", retryable=False)

    def _transport_error(self, operation: str, exc: Exception) -> StepError:
        from botocore import exceptions as e  # type: ignore[import-untyped]

        kind = type(exc).__name__
        prefix = f"target {self.name}: {operation} on secret {self.secret_id} failed ({kind})"
        if isinstance(exc, e.ConnectionError | e.HTTPClientError | e.CredentialRetrievalError):
            where = self.endpoint_url or f"region {self.region}"
            return StepError(
                f"{prefix}; AWS Secrets Manager ({where}) cannot be reached now, retried",
                retryable=True,
            )
        if isinstance(exc, e.NoCredentialsError | e.PartialCredentialsError):
            return StepError(f"{prefix}; no AWS credentials: {_CREDENTIALS_HINT}", retryable=False)
        if isinstance(exc, e.NoRegionError):
            return StepError(f"{prefix}; set region in its table", retryable=False)
        # ParamValidationError and the rest: their text may quote the parameters; never shown.
        return StepError(
            f"{prefix}; check secret_id, region and endpoint_url in its table", retryable=False
        )


class _Exists(Exception):
    """CreateSecret found the secret already there."""


def _code_and_status(exc: Any) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code") or "Unknown")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, status if isinstance(status, int) else 0


def _labels(description: dict[str, Any]) -> dict[str, str]:
    """Label -> version id, from DescribeSecret's VersionIdsToStages."""
    labels: dict[str, str] = {}
    for version_id, stages in (description.get("VersionIdsToStages") or {}).items():
        for stage in stages or ():
            labels[stage] = version_id
    return labels


def _marks(credential: str) -> list[dict[str, str]]:
    return [
        {"Key": MANAGED_BY_KEY, "Value": MANAGED_BY},
        {"Key": CREDENTIAL_KEY, "Value": credential},
    ]


def _same(text: str, material: DeployedMaterial) -> bool:
    try:
        held = material_from_document(text, "version")
    except KeyturnError:
        return False
    return same_material(held, material)


def _detail(changed: bool, version_id: str, stage: str, **extra: Any) -> dict[str, Any]:
    return {"changed": changed, "version_id": version_id, "stage": stage, **extra}

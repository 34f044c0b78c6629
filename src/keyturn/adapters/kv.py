"""A signing-key target in a KV version 2 secrets engine of HashiCorp Vault or OpenBao (hvac).

KV v2 has no staging label, so the cycle uses two paths of one mount:

- ``stage`` writes the key document (see :mod:`keyturn.adapters.material`) to the *pending*
  path (``<path>-pending`` unless configured); holders read the *main* path and still see
  the old key;
- ``promote`` writes the same document to the main path as a new KV version, after checking
  that the pending path holds it; the version before it keeps the old key;
- ``rollback`` writes the previous document to the main path again (a new KV version with the
  old content).

Every write is a check-and-set on the version read just before it (someone writing in between
makes the call fail, retryable, instead of being overwritten), and a call whose content is
already there writes nothing (KV would otherwise add an identical version). Both paths carry
keyturn's marks as KV custom metadata (``managed-by=keyturn``, ``keyturn-credential=<name>``,
``keyturn-rotation=<id>``); a path that exists without them is refused unless the target says
``adopt = true``. Nothing is ever deleted.

The calls block; the ``vault_kv`` target plugin runs them in keyturn's thread pool. Error
messages name the target and the path, never the key material, the token or the server's
response body.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import hvac  # type: ignore[import-untyped]
from hvac import exceptions as hvac_errors
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keyturn.adapters.material import (
    CREDENTIAL_KEY,
    MANAGED_BY,
    MANAGED_BY_KEY,
    material_document,
    material_from_document,
    same_material,
)
from keyturn.domain.errors import KeyturnError, StepError
from keyturn.ports import DeployedMaterial

#: The mark naming the rotation that last wrote the path's content.
ROTATION_KEY: Final = "keyturn-rotation"

T = TypeVar("T")

# ------------------------------------------------------------------------------ configuration


class KvSettings(BaseModel):
    """Where the key goes and how to log in. Tokens and AppRole secret ids are never written in
    the configuration: it names the environment variable or the file they are read from (a
    token at each call, so a token file renewed by an agent is picked up; a secret id at each
    AppRole login)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    mount: str = "secret"
    path: str
    #: Where ``stage`` writes; default ``<path>-pending``.
    pending_path: str | None = None
    namespace: str | None = None
    timeout_seconds: float = Field(default=10, gt=0)
    #: Take over a path that exists without keyturn's marks.
    adopt: bool = False
    auth: Literal["token", "approle"] = "token"
    token_env: str | None = None
    token_file: Path | None = None
    role_id: str | None = None
    secret_id_env: str | None = None
    secret_id_file: Path | None = None
    approle_mount: str = "approle"

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        inline = {
            "token": "token_env or token_file",
            "secret_id": "secret_id_env or secret_id_file",
        }
        for key, instead in inline.items():
            if isinstance(data, dict) and key in data:
                raise ValueError(
                    f"{key} is never written in the configuration; set {instead} to say where "
                    "keyturn reads it"
                )
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("url must start with https:// (or http:// for a local server)")
        return value.rstrip("/")

    @field_validator("mount", "path", "pending_path", "approle_mount")
    @classmethod
    def _kv_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        stripped = value.strip("/")
        if not stripped or any(part in ("", ".", "..") for part in stripped.split("/")):
            raise ValueError(f"{value!r} is not a KV path (name segments separated by /)")
        return stripped

    @model_validator(mode="after")
    def _auth(self) -> KvSettings:
        token = [k for k in ("token_env", "token_file") if getattr(self, k) is not None]
        approle = [
            k
            for k in ("role_id", "secret_id_env", "secret_id_file")
            if getattr(self, k) is not None
        ]
        secret_id = [k for k in ("secret_id_env", "secret_id_file") if getattr(self, k)]
        if self.auth == "token":
            if approle:
                raise ValueError(
                    f'{approle[0]} is for auth = "approle"; with auth = "token" set token_env '
                    "or token_file only"
                )
            if len(token) != 1:
                raise ValueError(
                    'auth = "token" needs exactly one of token_env (an environment variable) '
                    "or token_file (a file holding the token)"
                )
        else:
            if token:
                raise ValueError(
                    f'{token[0]} is for auth = "token"; with auth = "approle" set role_id and '
                    "secret_id_env or secret_id_file"
                )
            if not self.role_id or len(secret_id) != 1:
                raise ValueError(
                    'auth = "approle" needs role_id and exactly one of secret_id_env or '
                    "secret_id_file"
                )
        if self.pending == self.path:
            raise ValueError("pending_path must differ from path (stage must not touch path)")
        return self

    @property
    def pending(self) -> str:
        return self.pending_path or f"{self.path}-pending"

    def default_name(self) -> str:
        return f"vault_kv:{self.mount}/{self.path}"


# ------------------------------------------------------------------------------------ target


@dataclass(frozen=True)
class _Entry:
    """One KV path as read: its current version (0: no version yet), its custom metadata and
    the current version's data (None: absent, deleted or destroyed)."""

    path: str
    version: int
    marks: dict[str, str]
    data: Any = field(default=None, repr=False)

    @property
    def exists(self) -> bool:
        return self.version > 0


class KvTarget:
    """Deploys a signing key to a KV v2 path with a pending path beside it (see the module)."""

    def __init__(self, name: str, settings: KvSettings) -> None:
        self._name = name
        self._settings = settings
        self._lock = threading.Lock()
        self._client: Any = None
        self._logged_in = False
        self._mount_checked = False

    @property
    def name(self) -> str:
        return self._name

    # ------------------------------------------------------------------------- the cycle

    def stage(
        self, material: DeployedMaterial, credential: str, rotation_id: str
    ) -> dict[str, Any]:
        """Write `material` to the pending path (nothing when it already holds it)."""

        def run(client: Any) -> dict[str, Any]:
            pending = self._entry(client, self._settings.pending)
            if self._holds(pending, material):
                self._repair_marks(client, pending, credential, rotation_id)
                return self._detail(pending, changed=False)
            self._check_owner(pending, credential)
            version = self._write(client, pending, material)
            self._mark(client, pending, credential, rotation_id)
            return {**self._detail(pending, changed=True), "version": version}

        return self._call("stage", run)

    def read_back(self, staged: bool = False) -> DeployedMaterial:
        """What the pending path (`staged`) or the main path holds now."""

        def run(client: Any) -> DeployedMaterial:
            entry = self._entry(client, self._settings.pending if staged else self._settings.path)
            where = self._where(entry.path)
            if entry.data is None:
                state = "holds no key" if not entry.exists else "has its current version deleted"
                raise StepError(
                    f"target {self._name}: {where} {state}; "
                    f"{'stage' if staged else 'stage and promote'} a key to it first",
                    retryable=False,
                )
            return material_from_document(entry.data, f"target {self._name}: {where}")

        return self._call("read back", run)

    def promote(
        self, material: DeployedMaterial, credential: str, rotation_id: str
    ) -> dict[str, Any]:
        """Make `material` (it must be staged) what the main path holds, as a new version."""

        def run(client: Any) -> dict[str, Any]:
            main = self._entry(client, self._settings.path)
            if self._holds(main, material):
                self._repair_marks(client, main, credential, rotation_id)
                return self._detail(main, changed=False)
            self._check_owner(main, credential)
            pending = self._entry(client, self._settings.pending)
            if not self._holds(pending, material):
                raise StepError(
                    f"target {self._name}: {self._where(pending.path)} does not hold the key "
                    f"to promote; stage it again before promoting",
                    retryable=False,
                )
            version = self._write(client, main, material)
            self._mark(client, main, credential, rotation_id)
            return {
                **self._detail(main, changed=True),
                "version": version,
                "previous_version": main.version,
            }

        return self._call("promote", run)

    def rollback(
        self, previous: DeployedMaterial, credential: str, rotation_id: str
    ) -> dict[str, Any]:
        """Make `previous` what the main path holds again (a new version with its content)."""

        def run(client: Any) -> dict[str, Any]:
            main = self._entry(client, self._settings.path)
            if self._holds(main, previous):
                self._repair_marks(client, main, credential, rotation_id)
                return self._detail(main, changed=False)
            if not self._owned(main, credential) and not self._wrote_it(client, main, credential):
                self._check_owner(main, credential)
            version = self._write(client, main, previous)
            self._mark(client, main, credential, rotation_id)
            return {
                **self._detail(main, changed=True),
                "version": version,
                "previous_version": main.version,
            }

        return self._call("rollback", run)

    # ------------------------------------------------------------------------ KV access

    def _where(self, path: str) -> str:
        return f"{self._settings.mount}/{path}"

    def _detail(self, entry: _Entry, *, changed: bool) -> dict[str, Any]:
        return {"changed": changed, "path": self._where(entry.path), "version": entry.version}

    def _entry(self, client: Any, path: str) -> _Entry:
        kv = client.secrets.kv.v2
        mount = self._settings.mount
        try:
            metadata = kv.read_secret_metadata(path, mount_point=mount)
        except hvac_errors.InvalidPath as exc:
            if exc.errors:  # "no handler for route ...": no such mount, or not KV v2
                raise self._no_route() from None
            return _Entry(path, 0, {})
        body = metadata["data"]
        version = int(body.get("current_version") or 0)
        marks = dict(body.get("custom_metadata") or {})
        if version == 0:
            return _Entry(path, 0, marks)
        try:
            read = kv.read_secret_version(
                path, version=version, mount_point=mount, raise_on_deleted_version=False
            )
        except hvac_errors.InvalidPath:  # destroyed, or deleted since the metadata read
            return _Entry(path, version, marks)
        return _Entry(path, version, marks, read["data"]["data"])

    def _holds(self, entry: _Entry, material: DeployedMaterial) -> bool:
        if entry.data is None:
            return False
        try:
            held = material_from_document(entry.data, self._where(entry.path))
        except KeyturnError:
            return False
        return same_material(held, material)

    def _owned(self, entry: _Entry, credential: str) -> bool:
        return entry.marks.get(MANAGED_BY_KEY) == MANAGED_BY and (
            entry.marks.get(CREDENTIAL_KEY) == credential
        )

    def _check_owner(self, entry: _Entry, credential: str) -> None:
        """Refuse to write a path that exists without keyturn's marks for this credential,
        unless the target adopts it."""
        if not entry.exists or self._owned(entry, credential) or self._settings.adopt:
            return
        if entry.marks.get(MANAGED_BY_KEY) == MANAGED_BY:
            other = entry.marks.get(CREDENTIAL_KEY, "another credential")
            what = f"is managed by keyturn for credential {other!r}"
        else:
            what = (
                f"exists and is not managed by keyturn (no {MANAGED_BY_KEY}={MANAGED_BY} "
                "custom metadata)"
            )
        raise StepError(
            f"target {self._name}: {self._where(entry.path)} {what}; keyturn does not overwrite "
            f"it: set adopt = true in its [[credentials.{credential}.targets]] table to let "
            "keyturn take it over",
            retryable=False,
        )

    def _wrote_it(self, client: Any, main: _Entry, credential: str) -> bool:
        """The main path's unmarked content is what keyturn staged (a promote that stopped
        between its write and its marks): keyturn's own write, not someone else's."""
        if main.data is None:
            return False
        pending = self._entry(client, self._settings.pending)
        if not self._owned(pending, credential) or pending.data is None:
            return False
        try:
            staged = material_from_document(pending.data, self._where(pending.path))
        except KeyturnError:
            return False
        return self._holds(main, staged)

    def _write(self, client: Any, entry: _Entry, material: DeployedMaterial) -> int:
        """Write `material` as the next version of `entry`'s path, check-and-set on the
        version read; the new version number."""
        try:
            written = client.secrets.kv.v2.create_or_update_secret(
                entry.path,
                secret=material_document(material),
                cas=entry.version,
                mount_point=self._settings.mount,
            )
        except hvac_errors.InvalidRequest as exc:
            if any("check-and-set" in str(e) for e in exc.errors or ()):
                raise StepError(
                    f"target {self._name}: {self._where(entry.path)} changed while keyturn was "
                    f"writing it (its version is no longer {entry.version}: someone else wrote "
                    "it); nothing was overwritten, try again",
                    retryable=True,
                ) from None
            raise
        return int(written["data"]["version"])

    def _mark(self, client: Any, entry: _Entry, credential: str, rotation_id: str) -> None:
        """Set keyturn's marks, keeping any other custom metadata; no write when they are
        there already (custom metadata is not versioned: no new KV version either way)."""
        wanted = {
            **entry.marks,
            MANAGED_BY_KEY: MANAGED_BY,
            CREDENTIAL_KEY: credential,
            ROTATION_KEY: rotation_id,
        }
        if wanted != entry.marks:
            client.secrets.kv.v2.update_metadata(
                entry.path, custom_metadata=wanted, mount_point=self._settings.mount
            )

    def _repair_marks(self, client: Any, entry: _Entry, credential: str, rotation_id: str) -> None:
        """The content is already there: mark it when an earlier call wrote it but stopped
        before its marks (an unmarked path holding exactly this key)."""
        if not self._owned(entry, credential):
            self._mark(client, entry, credential, rotation_id)

    # ----------------------------------------------------------------- session and errors

    def _call(self, what: str, run: Callable[[Any], T]) -> T:
        """Run one operation with a logged-in client; an AppRole token that expired is
        replaced once. Every failure becomes a one-line StepError naming the target."""
        for attempt in (1, 2):
            with self._errors(what):
                try:
                    client = self._session()
                    self._check_mount(client)
                    return run(client)
                except hvac_errors.Forbidden:
                    if self._settings.auth == "approle" and attempt == 1:
                        with self._lock:
                            self._logged_in = False
                        continue
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _session(self) -> Any:
        settings = self._settings
        with self._lock:
            if self._client is None:
                # token="" so that hvac does not fall back to VAULT_TOKEN or ~/.vault-token.
                self._client = hvac.Client(
                    url=settings.url,
                    token="",
                    timeout=settings.timeout_seconds,
                    namespace=settings.namespace,
                )
            client = self._client
            if settings.auth == "token":
                client.token = self._secret(settings.token_env, settings.token_file, "token")
            elif not self._logged_in:
                secret_id = self._secret(
                    settings.secret_id_env, settings.secret_id_file, "secret_id"
                )
                try:
                    client.auth.approle.login(
                        role_id=settings.role_id,
                        secret_id=secret_id,
                        mount_point=settings.approle_mount,
                        use_token=True,
                    )
                except (hvac_errors.InvalidRequest, hvac_errors.Forbidden):
                    raise StepError(
                        f"target {self._name}: the AppRole login at auth/{settings.approle_mount} "
                        "was refused; check role_id, the secret_id it reads (an expired "
                        "secret_id needs a new one) and approle_mount",
                        retryable=False,
                    ) from None
                except hvac_errors.InvalidPath:
                    raise StepError(
                        f"target {self._name}: no AppRole auth method at "
                        f"auth/{settings.approle_mount}; set approle_mount to where it is enabled",
                        retryable=False,
                    ) from None
                self._logged_in = True
            return client

    def _secret(self, env: str | None, file: Path | None, what: str) -> str:
        if env is not None:
            value = os.environ.get(env, "").strip()
            if not value:
                raise StepError(
                    f"target {self._name}: environment variable {env} (its {what}_env) is not "
                    "set or empty",
                    retryable=False,
                )
            return value
        assert file is not None  # the settings validator requires one of the two
        try:
            value = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise StepError(
                f"target {self._name}: cannot read its {what}_file {file} ({reason})",
                retryable=False,
            ) from None
        if not value:
            raise StepError(
                f"target {self._name}: its {what}_file {file} is empty", retryable=False
            )
        return value

    def _check_mount(self, client: Any) -> None:
        """Once per target: the mount is a KV version 2 engine. (On a KV version 1 engine the
        KV v2 calls would not fail: they would write keys named data/... and metadata/....)
        Any token with a capability under the mount may ask."""
        if self._mount_checked:
            return
        mount = self._settings.mount
        try:
            info = client.adapter.get(f"/v1/sys/internal/ui/mounts/{mount}")["data"]
        except hvac_errors.Forbidden:
            raise StepError(
                f"target {self._name}: cannot look up the mount {mount}/: it does not exist, "
                f"or the token is not valid or its policy grants nothing under {mount}/",
                retryable=False,
            ) from None
        kind = info.get("type")
        version = (info.get("options") or {}).get("version")
        if info.get("path") != f"{mount}/" or kind not in ("kv", "generic") or version != "2":
            found = f"{kind} version {version}" if kind in ("kv", "generic") else str(kind)
            raise StepError(
                f"target {self._name}: {mount}/ is not the path of a KV version 2 engine "
                f"(found a {found} engine at {info.get('path')}); set mount to a KV v2 "
                "engine's path",
                retryable=False,
            )
        self._mount_checked = True

    def _no_route(self) -> StepError:
        mount = self._settings.mount
        return StepError(
            f"target {self._name}: Vault has no KV version 2 engine at {mount}/ (no route for "
            f"{mount}/metadata/...); set mount to the engine's path, or enable it with "
            f"`bao secrets enable -path={mount} kv-v2`",
            retryable=False,
        )

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate hvac and transport errors. Their text may quote response bodies, so it
        is never copied: the message says what failed in keyturn's words (`from None` keeps
        the original out of tracebacks, too)."""
        try:
            yield
        except StepError:
            raise
        except KeyturnError as exc:  # a stored document that is not keyturn's (names no content)
            raise StepError(str(exc), retryable=False) from None
        except (hvac_errors.VaultError, OSError, KeyError, TypeError, ValueError) as exc:
            prefix = f"target {self._name}: {what} at {self._settings.url}"
            raise self._translated(exc, prefix) from None

    def _translated(self, exc: Exception, prefix: str) -> StepError:
        if isinstance(exc, hvac_errors.VaultError):
            for error_class, text, retryable in _HTTP_ERRORS:
                if isinstance(exc, error_class):
                    hint = text.format(mount=self._settings.mount, path=self._settings.path)
                    return StepError(f"{prefix}: {hint}", retryable=retryable)
            # 500, 502 and statuses hvac has no class for: the server may answer next time.
            return StepError(
                f"{prefix}: Vault answered with an error ({type(exc).__name__})", retryable=True
            )
        if isinstance(exc, OSError):  # requests' exceptions are OSErrors
            kind = type(exc).__name__
            if kind == "SSLError":
                return StepError(
                    f"{prefix}: TLS verification failed; set VAULT_CACERT to the CA that signed "
                    "the server's certificate",
                    retryable=False,
                )
            return StepError(
                f"{prefix}: cannot reach Vault ({kind}); is the server running and reachable?",
                retryable=True,
            )
        return StepError(
            f"{prefix}: unexpected answer from the server (not a KV version 2 response)",
            retryable=True,
        )


#: hvac's error classes, in keyturn's words (never the server's text) and whether trying again
#: may help.
_HTTP_ERRORS: Final[tuple[tuple[type[Exception], str, bool], ...]] = (
    (
        hvac_errors.Forbidden,
        "permission denied (HTTP 403); the token must be valid and its policy needs create, "
        "read and update on {mount}/data/{path} and {mount}/metadata/{path} and the same for "
        "the pending path",
        False,
    ),
    (
        hvac_errors.Unauthorized,
        "the token was not accepted (HTTP 401); check the token keyturn reads",
        False,
    ),
    (
        hvac_errors.InvalidPath,
        "not found (HTTP 404); check url, mount, path and namespace",
        False,
    ),
    (
        hvac_errors.InvalidRequest,
        "the request was refused (HTTP 400); check that {mount} is a KV version 2 engine and "
        "path is a valid secret path",
        False,
    ),
    (hvac_errors.RateLimitExceeded, "rate limited (HTTP 429)", True),
    (
        hvac_errors.VaultDown,
        "Vault is sealed or unavailable (HTTP 503); unseal it or wait for it",
        True,
    ),
    (hvac_errors.VaultNotInitialized, "Vault is not initialised (HTTP 501)", True),
)

"""The webhook-secrets deploy target: the file a webhook receiver reads its secrets from.

Format (shared with :class:`keyturn.webhooks.SecretsFile`, which reads it)::

    {"version": "<16 hex>", "secrets": ["whs-…", …], "updated_at": "<iso>"}

The version is the first 16 hex of SHA-256 over the sorted secrets (:func:`secrets_version`), so a
deployer can read it back from the receiver (``GET /_receiver/state`` of the reference receiver)
to confirm the receiver loaded exactly this set. The file is mode 0600 and replaced atomically
(temporary file in the same directory, fsync, rename, fsync of the directory): a receiver sees the
old set or the new one, never a torn file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import httpx

from keyturn.adapters.deploy import DIRECTORY_MODE, FILE_MODE, read_deployed, write_atomically
from keyturn.domain.errors import KeyturnError
from keyturn.ports import SecretsProbe, SecretsTarget
from keyturn.webhooks import (
    SecretsFileError,
    parse_secrets_document,
    render_secrets_document,
    secrets_version,
)

__all__ = ["ReceiverStateProbe", "WebhookSecretsFileTarget", "secrets_version"]

RECEIVER_STATE_PATH: Final = "/_receiver/state"


class WebhookSecretsFileTarget(SecretsTarget):
    """Deploys the set of webhook secrets a receiver accepts, as one JSON file at `path`."""

    def __init__(self, name: str, path: Path | str) -> None:
        self._name = name
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"WebhookSecretsFileTarget(name={self._name!r}, path={str(self.path)!r})"

    def _error(self, problem: str) -> KeyturnError:
        return KeyturnError(f"deploy target {self._name}: {problem}")

    def _ensure_directory(self) -> None:
        directory = self.path.parent
        if directory.is_dir():
            return
        if directory.exists():
            raise self._error(f"{directory} is not a directory; point the target at a file path")
        try:
            directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(
                f"cannot create directory {directory} ({exc.strerror}); create it or fix the"
                " permissions of its parent"
            ) from None

    def _current(self) -> tuple[str, tuple[str, ...]] | None:
        """The (version, secrets) on disk if the file is valid and 0600, else None."""
        try:
            if (self.path.stat().st_mode & 0o777) != FILE_MODE:
                return None
            return parse_secrets_document(self.path.read_bytes())
        except (OSError, SecretsFileError):
            return None

    def deploy(self, secrets: Sequence[str]) -> str:
        """Write `secrets` (order kept, duplicates dropped); return the version id.

        Idempotent: when the file already holds this exact list, it is left untouched (the
        receiver does not reload for nothing).
        """
        if isinstance(secrets, str):
            raise self._error("deploy() takes a list of secrets, not one string")
        if not secrets:
            raise self._error(
                "refusing to deploy an empty list of webhook secrets: the receiver would reject"
                " every event; deploy at least one secret"
            )
        try:
            version, content = render_secrets_document(secrets)
        except SecretsFileError as exc:
            raise self._error(str(exc)) from None
        unique = tuple(dict.fromkeys(secrets))
        if self._current() == (version, unique):
            return version
        self._ensure_directory()
        try:
            write_atomically(self.path, content, mode=FILE_MODE)
        except OSError as exc:
            raise self._error(
                f"cannot write {self.path} ({exc.strerror}); check the directory's permissions"
                " and free space"
            ) from None
        return version

    def read_back(self) -> tuple[str, tuple[str, ...]]:
        """(version, secrets) as a receiver would load them now; KeyturnError otherwise."""
        raw = read_deployed(self.path, "the webhook secrets", self._error)
        try:
            version, secrets = parse_secrets_document(raw, where=str(self.path))
        except SecretsFileError as exc:
            raise self._error(f"{exc}; deploy the webhook secrets again") from None
        if version != secrets_version(secrets):
            raise self._error(
                f"{self.path} names version {version} but its secrets are version"
                f" {secrets_version(secrets)}; deploy the webhook secrets again"
            )
        return version, secrets


class ReceiverStateProbe(SecretsProbe):
    """Asks a reference receiver (``keyturn receiver serve``) which secrets version it loaded.

    `base_url` is the receiver's root URL (e.g. ``http://127.0.0.1:8080``). Implements the
    :class:`~keyturn.ports.SecretsProbe` port (async); ``*_sync`` variants serve scripts and
    tests. A receiver that does not answer is a KeyturnError.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        async_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._name = name
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._transport = transport
        self._async_transport = async_transport

    @property
    def name(self) -> str:
        return self._name

    @property
    def state_url(self) -> str:
        return self.base_url + RECEIVER_STATE_PATH

    def __repr__(self) -> str:
        return f"ReceiverStateProbe(name={self._name!r}, base_url={self.base_url!r})"

    def _no_answer(self, exc: Exception) -> KeyturnError:
        return KeyturnError(
            f"probe {self._name}: the receiver at {self.state_url} did not answer"
            f" ({type(exc).__name__}); check it is running and the URL is right"
        )

    def _version(self, response: httpx.Response) -> str | None:
        try:
            document = response.json()
        except ValueError:
            document = None
        if response.status_code != 200 or not isinstance(document, dict):
            raise KeyturnError(
                f"probe {self._name}: {self.state_url} answered {response.status_code}; is it"
                " a keyturn receiver?"
            )
        version = document.get("secrets_version")
        return version if isinstance(version, str) else None

    async def loaded_version(self) -> str | None:
        """The secrets version the receiver has in force (None if it has none loaded)."""
        try:
            async with httpx.AsyncClient(
                timeout=self._timeout, transport=self._async_transport
            ) as client:
                response = await client.get(self.state_url)
        except httpx.HTTPError as exc:
            raise self._no_answer(exc) from None
        return self._version(response)

    def loaded_version_sync(self) -> str | None:
        """:meth:`loaded_version`, blocking."""
        try:
            with httpx.Client(timeout=self._timeout, transport=self._transport) as client:
                response = client.get(self.state_url)
        except httpx.HTTPError as exc:
            raise self._no_answer(exc) from None
        return self._version(response)

    def wait_for_version(self, version: str, *, timeout: float = 10.0) -> None:
        """Block until the receiver reports `version`; KeyturnError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.loaded_version_sync()
            if seen == version:
                return
            if time.monotonic() >= deadline:
                raise KeyturnError(
                    f"probe {self._name}: the receiver still has secrets version {seen} after"
                    f" {timeout:.0f} s, not {version}; check it reads the deployed secrets file"
                )
            time.sleep(0.05)

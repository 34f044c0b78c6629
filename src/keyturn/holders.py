"""For a Python service that holds a signing key keyturn rotates: load it from a ``file``
target's directory, follow its replacement, and tell keyturn's probes which key it uses.

    held = HeldKey("/etc/api/dfns-key")          # private_key.pem + credential.json
    key = held.current()                          # reloaded when the files change
    sign(key.credential_id, key.private_key_pem)
    app = Starlette(routes=starlette_routes(held))

The holder route (``GET /.well-known/keyturn-holder`` by default) answers JSON, so a service in
any language can offer the same to keyturn's ``http`` probe::

    200 {"fingerprint": "<16 lowercase hex digits>",
         "credential_id": "<the Dfns credential id the key signs as>",
         "loaded_at": "<ISO 8601 UTC time the key was loaded>"}
    503 {"error": "<one line: why no key is loaded>"}

A service may add fields (the demo adds ``last_signed_ok_at`` and ``last_error``); it never
puts the key, or anything derived from it but the fingerprint, in the answer.

The fingerprint is the first 16 hex digits of SHA-256 over the **public** key's PEM
(SubjectPublicKeyInfo) with all whitespace removed, the id keyturn records for a key. In a
shell: ``openssl pkey -in private_key.pem -pubout | tr -d ' \\t\\r\\n' | sha256sum | cut -c1-16``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyturn.adapters.keys import CryptoKeys, InvalidPrivateKey, load_private_key, public_pem_of

__all__ = [
    "DEFAULT_PATH",
    "HeldKey",
    "HolderError",
    "LoadedKey",
    "fingerprint_of_private",
    "key_fingerprint",
    "starlette_routes",
]

DEFAULT_PATH: Final = "/.well-known/keyturn-holder"
PRIVATE_KEY_FILE: Final = "private_key.pem"
CREDENTIAL_FILE: Final = "credential.json"
#: How many times a load is tried again when the files change while they are read.
_LOAD_TRIES: Final = 5

_KEYS = CryptoKeys()


class HolderError(Exception):
    """The key directory holds no usable key (the message names the file, never its content)."""


def key_fingerprint(public_pem: str) -> str:
    """keyturn's fingerprint of a public key: SHA-256 over its PEM without any whitespace,
    the first 16 hex digits."""
    return hashlib.sha256("".join(public_pem.split()).encode()).hexdigest()[:16]


def fingerprint_of_private(pem: bytes) -> str:
    """The fingerprint of the public half of a PEM private key."""
    return key_fingerprint(_KEYS.public_pem(pem))


@dataclass(frozen=True)
class LoadedKey:
    """A signing key and the credential ids read with it, from one version of the files."""

    credential_id: str
    credential_uuid: str
    private_key_pem: bytes = field(repr=False)
    fingerprint: str
    loaded_at: datetime


class _Changed(Exception):
    """The files changed while being read."""


#: What identifies one version of the files: per file, its resolved path, inode, size, mtime.
_Signature = tuple[tuple[str, int, int, int], ...]


def _credential_ids(raw: bytes, path: Path) -> tuple[str, str]:
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise HolderError(f"{path} is not valid JSON") from None
    ids = []
    for key in ("credentialId", "credentialUuid"):
        value = document.get(key) if isinstance(document, dict) else None
        if not isinstance(value, str) or not value:
            raise HolderError(f"{path} has no string {key!r}")
        ids.append(value)
    return ids[0], ids[1]


class HeldKey:
    """The key in `directory` (``private_key.pem`` and ``credential.json``, as keyturn's file
    target writes them), reloaded when the files change.

    Each :meth:`current` call (or, with `check_every` > 0, the first call after that many
    seconds) compares the files' identity (resolved path, inode, size, mtime) with the loaded
    version's, and loads them again when it differs. A load resolves each file's path once (so
    a symlinked directory swapped at once, as a Kubernetes volume is, is read from one version)
    and reads again when the files changed while being read. A load that fails keeps the key
    loaded before (:attr:`last_load_error` says why) and is tried again at the next check; with
    no key loaded yet, :meth:`current` raises :class:`HolderError`.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        check_every: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.check_every = check_every
        self._clock = clock
        self._lock = threading.Lock()
        self._key: LoadedKey | None = None
        self._signature: _Signature | None = None
        self._checked_at: float | None = None
        self.last_load_error: str | None = None

    def __repr__(self) -> str:
        return f"HeldKey(directory={str(self.directory)!r})"

    def _paths(self) -> tuple[Path, Path]:
        return (
            (self.directory / PRIVATE_KEY_FILE).resolve(),
            (self.directory / CREDENTIAL_FILE).resolve(),
        )

    @staticmethod
    def _signature_of(paths: tuple[Path, ...]) -> _Signature:
        parts = []
        for path in paths:
            st = path.stat()
            parts.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(parts)

    def _current_signature(self) -> _Signature | None:
        try:
            return self._signature_of(self._paths())
        except OSError:
            return None

    def _read_once(self) -> tuple[LoadedKey, _Signature]:
        paths = self._paths()
        key_path, credential_path = paths
        try:
            before = self._signature_of(paths)
            pem = key_path.read_bytes()
            raw = credential_path.read_bytes()
            after = self._signature_of(paths)
        except OSError as exc:
            if self._paths() != paths:
                raise _Changed from None  # a symlink swapped while reading
            raise HolderError(
                f"cannot read {exc.filename or self.directory} ({exc.strerror})"
            ) from None
        if before != after or self._paths() != paths:
            raise _Changed
        credential_id, credential_uuid = _credential_ids(raw, credential_path)
        try:
            public_pem = public_pem_of(load_private_key(pem, what=str(key_path)))
        except InvalidPrivateKey as exc:  # its message never quotes the key
            raise HolderError(str(exc)) from None
        fingerprint = key_fingerprint(public_pem)
        loaded = LoadedKey(credential_id, credential_uuid, pem, fingerprint, datetime.now(UTC))
        return loaded, after

    def _load(self) -> None:
        for _ in range(_LOAD_TRIES):
            try:
                self._key, self._signature = self._read_once()
            except _Changed:
                continue
            self.last_load_error = None
            return
        raise HolderError(f"the files in {self.directory} kept changing while being read")

    def reload(self) -> LoadedKey:
        """Load the files now, whatever their identity; HolderError if they hold no key."""
        with self._lock:
            self._checked_at = self._clock()
            try:
                self._load()
            except HolderError as exc:
                self.last_load_error = str(exc)
                raise
            assert self._key is not None
            return self._key

    def current(self) -> LoadedKey:
        """The key to sign with now (loaded again first if the files changed)."""
        with self._lock:
            now = self._clock()
            due = (
                self._key is None
                or self._checked_at is None
                or now - self._checked_at >= self.check_every
            )
            if due:
                self._checked_at = now
                if self._key is None or self._current_signature() != self._signature:
                    try:
                        self._load()
                    except HolderError as exc:
                        self.last_load_error = str(exc)
                        if self._key is None:
                            raise
            assert self._key is not None
            return self._key

    def status(self) -> dict[str, Any]:
        """What the holder route answers: the fingerprint, credential id and load time of the
        key :meth:`current` gives now (never the key)."""
        key = self.current()
        return {
            "fingerprint": key.fingerprint,
            "credential_id": key.credential_id,
            "loaded_at": key.loaded_at.isoformat().replace("+00:00", "Z"),
        }


def starlette_routes(
    held: HeldKey,
    path: str = DEFAULT_PATH,
    *,
    extra: Callable[[], Mapping[str, Any]] | None = None,
) -> list[Route]:
    """The holder route for a Starlette app: GET `path` answers :meth:`HeldKey.status` (plus
    what `extra()` returns), or 503 with the reason when no key is loaded."""

    def holder(request: Request) -> JSONResponse:
        # A plain function: Starlette runs it in its thread pool (it may read the key files).
        try:
            document: dict[str, Any] = held.status()
        except HolderError as exc:
            document = {"error": str(exc)}
            if extra is not None:
                document.update(extra())
            return JSONResponse(document, status_code=503)
        if extra is not None:
            document.update(extra())
        return JSONResponse(document)

    return [Route(path, holder, methods=["GET"])]

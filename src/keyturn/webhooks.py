"""Receiver-side verification of Dfns webhook deliveries, with several secrets at once.

A Dfns webhook's secret cannot be changed: keyturn rotates it by creating a second webhook, so for
a while events arrive signed with the old secret AND with the new one. A receiver built on this
module accepts a delivery signed with any secret in its current set, and picks up a new set the
moment keyturn replaces the secrets file.

    secrets = SecretsFile("/etc/myapp/webhook-secrets.json")   # reloads itself when it changes
    verified = verify(raw_body, request_headers.get(SIGNATURE_HEADER), secrets.secrets)
    verified.event["id"], verified.secret_index

    app = WebhookSignatureMiddleware(my_asgi_app, secrets)      # 401 JSON on rejection;
    # the app then finds the Verified result in scope["state"]["webhook"] (request.state.webhook)

Delivery format: a POST of the JSON event with header ``X-DFNS-WEBHOOK-SIGNATURE:
sha256=<lowercase hex HMAC-SHA256(key = secret, message = raw body)>``; the event carries
``timestampSent`` (unix seconds), and events more than ``tolerance`` seconds (300 by default) from
now, either way, are refused as replays or clock skew.

Secrets file (written by keyturn's ``WebhookSecretsFileTarget``, mode 0600, replaced atomically):
``{"version": "<id>", "secrets": ["whs-…", …], "updated_at": "<iso>"}``.

This module uses only the standard library (and ASGI types by duck typing); no secret ever
appears in a message, an exception or a repr.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

__all__ = [
    "DEFAULT_TOLERANCE",
    "SIGNATURE_HEADER",
    "STATE_KEY",
    "SecretsFile",
    "SecretsFileError",
    "SignatureError",
    "Verified",
    "WebhookSignatureMiddleware",
    "WebhookVerifier",
    "parse_secrets_document",
    "render_secrets_document",
    "secrets_version",
    "sign",
    "verify",
]

SIGNATURE_HEADER: Final = "X-DFNS-WEBHOOK-SIGNATURE"
DEFAULT_TOLERANCE: Final = 300.0
#: Where the middleware puts the :class:`Verified` result: ``scope["state"][STATE_KEY]``.
STATE_KEY: Final = "webhook"
#: Deliveries larger than this are refused by the middleware (Dfns events are a few KiB).
DEFAULT_MAX_BODY: Final = 1024 * 1024

_HEADER_RE: Final = re.compile(r"sha256=([0-9a-fA-F]{64})")
_SIGNATURE_LOWER: Final = SIGNATURE_HEADER.lower()

#: Every reason code :class:`SignatureError` can carry.
REASONS: Final = (
    "missing_header",
    "malformed_header",
    "no_secrets",
    "bad_signature",
    "malformed_body",
    "stale",
    "body_too_large",
)


# ------------------------------------------------------------------------------- verification


class SignatureError(Exception):
    """A delivery was refused. `reason` is a machine-readable code (see :data:`REASONS`).

    `event_id` is the event's ``id`` when the body could be parsed (unverified: for logs only).
    """

    def __init__(self, reason: str, message: str, *, event_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.event_id = event_id

    def __repr__(self) -> str:
        return f"SignatureError(reason={self.reason!r}, message={self.message!r})"


@dataclass(frozen=True)
class Verified:
    """A delivery whose signature matched: which secret (its index, never the secret) and the
    parsed event."""

    secret_index: int
    event: Mapping[str, Any] = field(repr=False)
    timestamp_sent: float

    @property
    def event_id(self) -> str | None:
        value = self.event.get("id")
        return value if isinstance(value, str) else None

    @property
    def kind(self) -> str | None:
        value = self.event.get("kind")
        return value if isinstance(value, str) else None

    def __repr__(self) -> str:
        return (
            f"Verified(secret_index={self.secret_index}, event_id={self.event_id!r},"
            f" kind={self.kind!r}, timestamp_sent={self.timestamp_sent})"
        )


def sign(secret: str, body: bytes) -> str:
    """The header value Dfns sends for `body` under `secret`: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def _peek_id(body: bytes) -> str | None:
    """The event id of an (unverified) body, when it parses; for rejection records only."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(document, dict):
        value = document.get("id")
        if isinstance(value, str) and len(value) <= 200:
            return value
    return None


def verify(
    body: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    now: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Verified:
    """Check a delivery: `body` exactly as received, `header` the signature header's value.

    Every secret is compared (in constant time) so the time taken does not depend on which one
    matched. Raises :class:`SignatureError` with reason ``missing_header``, ``malformed_header``,
    ``no_secrets``, ``bad_signature``, ``malformed_body`` or ``stale``.
    """
    if header is None or not header.strip():
        raise SignatureError(
            "missing_header",
            f"the request has no {SIGNATURE_HEADER} header; only signed Dfns webhook deliveries"
            " are accepted",
            event_id=_peek_id(body),
        )
    match = _HEADER_RE.fullmatch(header.strip())
    if match is None:
        raise SignatureError(
            "malformed_header",
            f"the {SIGNATURE_HEADER} header is not 'sha256=' followed by 64 hex digits;"
            " check the sender signs as Dfns does",
            event_id=_peek_id(body),
        )
    if not secrets:
        raise SignatureError(
            "no_secrets",
            "the receiver has no webhook secret loaded; deploy the webhook secrets file"
            " (keyturn writes it) and check the receiver can read it",
            event_id=_peek_id(body),
        )
    received = match.group(1).lower().encode("ascii")
    matched = -1
    for index, secret in enumerate(secrets):
        expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected.encode("ascii"), received) and matched < 0:
            matched = index
    if matched < 0:
        raise SignatureError(
            "bad_signature",
            f"the signature matches none of the {len(secrets)} webhook secret(s) loaded (wrong"
            " secret or altered body); check the receiver's secrets file holds the webhook's"
            " current secret",
            event_id=_peek_id(body),
        )
    try:
        event = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SignatureError(
            "malformed_body", "the signed body is not valid UTF-8 JSON; it is not a Dfns event"
        ) from None
    if not isinstance(event, dict):
        raise SignatureError(
            "malformed_body", "the signed body is not a JSON object; it is not a Dfns event"
        )
    event_id = event.get("id") if isinstance(event.get("id"), str) else None
    sent = event.get("timestampSent")
    if isinstance(sent, bool) or not isinstance(sent, int | float):
        raise SignatureError(
            "malformed_body",
            "the event has no numeric timestampSent; it is not a Dfns event",
            event_id=event_id,
        )
    current = time.time() if now is None else now
    skew = current - float(sent)
    if abs(skew) > tolerance:
        direction = "old" if skew > 0 else "in the future"
        raise SignatureError(
            "stale",
            f"the event's timestampSent is {abs(skew):.0f} s {direction} (at most"
            f" {tolerance:.0f} s allowed): a replay, or a clock out of sync; check the clocks",
            event_id=event_id,
        )
    return Verified(secret_index=matched, event=event, timestamp_sent=float(sent))


# ------------------------------------------------------------------------------- secrets file


class SecretsFileError(Exception):
    """The secrets file is missing or invalid (one line, never the secrets themselves)."""


def secrets_version(secrets: Sequence[str]) -> str:
    """The version id of a set of secrets: the first 16 hex of SHA-256 over them, sorted.

    Order and duplicates do not matter: the same set always has the same id.
    """
    canonical = json.dumps(sorted(set(secrets)), separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()[:16]


def _unique(secrets: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(secrets))


def render_secrets_document(
    secrets: Sequence[str], *, updated_at: datetime | None = None
) -> tuple[str, bytes]:
    """(version, file content) for `secrets` (order kept, duplicates dropped)."""
    unique = _unique(secrets)
    for position, secret in enumerate(unique, start=1):
        if not isinstance(secret, str) or not secret.strip():
            raise SecretsFileError(f"webhook secret #{position} is empty; pass non-empty strings")
    version = secrets_version(unique)
    stamp = (updated_at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    document = {"version": version, "secrets": list(unique), "updated_at": stamp}
    return version, (json.dumps(document, indent=2) + "\n").encode("utf-8")


def parse_secrets_document(
    raw: bytes, *, where: str = "the secrets file"
) -> tuple[str, tuple[str, ...]]:
    """(version, secrets) from a secrets file's bytes; SecretsFileError when it is not one.

    A file without a ``version`` gets the computed :func:`secrets_version`.
    """
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SecretsFileError(
            f"{where} is not valid JSON (empty or half-written?); write it again"
        ) from None
    if not isinstance(document, dict):
        raise SecretsFileError(f'{where} must hold a JSON object with a "secrets" list')
    secrets = document.get("secrets")
    if not isinstance(secrets, list):
        raise SecretsFileError(f'{where} has no "secrets" list; write it again')
    for position, secret in enumerate(secrets, start=1):
        if not isinstance(secret, str) or not secret.strip():
            raise SecretsFileError(
                f"{where}: secret #{position} is not a non-empty string; write it again"
            )
    unique = _unique(secrets)
    version = document.get("version")
    if not isinstance(version, str) or not version:
        version = secrets_version(unique)
    return version, unique


#: After a load, a file modified less than this long ago is re-read now and then, because a
#: coarse mtime can hide a second in-place write of the same size.
_RACY_WINDOW: Final = 1.0
_RACY_RECHECK: Final = 0.1


@dataclass(frozen=True)
class _Loaded:
    version: str
    secrets: tuple[str, ...]
    raw: bytes


class SecretsFile:
    """The receiver's secrets file, reloaded whenever it changes.

    Every access to :attr:`secrets` or :attr:`version` costs one ``stat``; the file is read again
    only when its inode, size or mtime changed. A file that is missing, unreadable or invalid
    (say, half-written by a careless writer) keeps the last good set in force and is reported in
    :attr:`error`. With `required` (the default) the first load must succeed.
    """

    def __init__(self, path: str | os.PathLike[str], *, required: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._stat_key: tuple[int, int, int, int] | None = None
        self._racy_until = 0.0
        self._next_recheck = 0.0
        self._error: str | None = None
        self.loads = 0
        if required:
            self._refresh(force=True)
            if self._loaded is None:
                raise SecretsFileError(self._error or f"cannot load {self.path}")
        else:
            self._refresh(force=True)

    def __repr__(self) -> str:
        loaded = self._loaded
        version = loaded.version if loaded else None
        count = len(loaded.secrets) if loaded else 0
        return f"SecretsFile(path={str(self.path)!r}, version={version!r}, secrets={count})"

    # ------------------------------------------------------------------------------ access

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secrets in force now (empty if none was ever loaded)."""
        self._refresh()
        loaded = self._loaded
        return loaded.secrets if loaded else ()

    @property
    def version(self) -> str | None:
        """The version id of the set in force (the file's ``version``), None if none loaded."""
        self._refresh()
        loaded = self._loaded
        return loaded.version if loaded else None

    def snapshot(self) -> tuple[str | None, tuple[str, ...]]:
        """(version, secrets) in force, consistent with each other."""
        self._refresh()
        loaded = self._loaded
        return (loaded.version, loaded.secrets) if loaded else (None, ())

    @property
    def error(self) -> str | None:
        """Why the file on disk is not the set in force (missing, invalid), or None."""
        return self._error

    def reload(self) -> None:
        """Read the file now, changed or not (keeps the last good set if it is unusable)."""
        self._refresh(force=True)

    # ----------------------------------------------------------------------------- loading

    def _refresh(self, *, force: bool = False) -> None:
        try:
            st = self.path.stat()
        except OSError as exc:
            if self._stat_key is not None or self._error is None or force:
                self._stat_key = None
                self._error = self._describe(exc)
            return
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if not force and key == self._stat_key:
            now = time.monotonic()
            if now >= self._racy_until or now < self._next_recheck:
                return
            self._next_recheck = now + _RACY_RECHECK
        with self._lock:
            self._load(key, st.st_mtime)

    def _describe(self, exc: OSError) -> str:
        if isinstance(exc, FileNotFoundError):
            return f"secrets file {self.path} does not exist; deploy the webhook secrets first"
        return (
            f"cannot read secrets file {self.path} ({exc.strerror or type(exc).__name__});"
            " check its permissions"
        )

    def _load(self, key: tuple[int, int, int, int], mtime: float) -> None:
        if time.time() - mtime < _RACY_WINDOW:
            self._racy_until = time.monotonic() + _RACY_WINDOW
        self._stat_key = key
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            self._stat_key = None
            self._error = self._describe(exc)
            return
        current = self._loaded
        if current is not None and raw == current.raw:
            self._error = None
            return
        try:
            version, secrets = parse_secrets_document(raw, where=f"secrets file {self.path}")
        except SecretsFileError as exc:
            self._error = str(exc)
            # an unusable file may be mid-write: look again shortly even if its stat is unchanged
            self._racy_until = time.monotonic() + _RACY_WINDOW
            return
        self._loaded = _Loaded(version=version, secrets=secrets, raw=raw)
        self._error = None
        self.loads += 1


SecretsSource = SecretsFile | Sequence[str] | Callable[[], Sequence[str]]


def _secrets_getter(source: SecretsSource) -> Callable[[], Sequence[str]]:
    if isinstance(source, SecretsFile):
        return lambda: source.secrets
    if isinstance(source, str):
        raise TypeError("pass a sequence of secrets (a list), not a single string")
    if callable(source):
        return source
    fixed = _unique(source)
    return lambda: fixed


# ----------------------------------------------------------------------------------- function


class WebhookVerifier:
    """Plain-function style: ``WebhookVerifier(SecretsFile(path)).verify(body, headers)``.

    `secrets_source` is a :class:`SecretsFile` (reloaded on change), a fixed list of secrets, or
    a function returning the secrets in force.
    """

    def __init__(
        self,
        secrets_source: SecretsSource,
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secrets = _secrets_getter(secrets_source)
        self.tolerance = tolerance
        self._clock = clock

    def __repr__(self) -> str:
        return f"WebhookVerifier(tolerance={self.tolerance})"

    def verify(self, body: bytes, headers: Mapping[str, str] | None) -> Verified:
        """Verify a delivery; `headers` in any letter case. Raises :class:`SignatureError`."""
        header = None if headers is None else _find_header(headers)
        return self.verify_header(body, header)

    def verify_header(self, body: bytes, header: str | None) -> Verified:
        """Verify a delivery given the signature header's value (None when absent)."""
        return verify(body, header, self._secrets(), now=self._clock(), tolerance=self.tolerance)


def _find_header(headers: Mapping[str, str]) -> str | None:
    value = headers.get(SIGNATURE_HEADER)
    if value is None:
        value = headers.get(_SIGNATURE_LOWER)
    if value is None:
        for name, candidate in headers.items():
            if name.lower() == _SIGNATURE_LOWER:
                return candidate
    return value


# --------------------------------------------------------------------------------- middleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RejectHook = Callable[[SignatureError, Scope], None]


class WebhookSignatureMiddleware:
    """ASGI middleware: verify every POST under `path_prefix` before the app sees it.

    The body is buffered (at most `max_body_bytes`), verified, and replayed to the app, which
    finds the :class:`Verified` result in ``scope["state"]["webhook"]``. A refused delivery is
    answered ``401 {"error": {"reason", "message"}}`` (413 for an oversized body) and never
    reaches the app; `on_reject(error, scope)` is called first, if given.
    """

    def __init__(
        self,
        app: ASGIApp,
        secrets: SecretsSource,
        path_prefix: str = "/",
        *,
        methods: Sequence[str] = ("POST",),
        tolerance: float = DEFAULT_TOLERANCE,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        clock: Callable[[], float] = time.time,
        on_reject: RejectHook | None = None,
    ) -> None:
        self.app = app
        self.path_prefix = path_prefix
        self.methods = frozenset(m.upper() for m in methods)
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject
        self.verifier = WebhookVerifier(secrets, tolerance=tolerance, clock=clock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in self.methods
            or not scope["path"].startswith(self.path_prefix)
        ):
            await self.app(scope, receive, send)
            return
        header: str | None = None
        for name, value in scope["headers"]:
            if name.lower() == b"x-dfns-webhook-signature":
                header = value.decode("latin-1")
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                error = SignatureError(
                    "body_too_large",
                    f"the body is larger than {self.max_body_bytes} bytes; it is not a Dfns"
                    " webhook event",
                )
                await self._reject(error, scope, send, status=413)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            verified = self.verifier.verify_header(body, header)
        except SignatureError as error:
            await self._reject(error, scope, send, status=401)
            return
        state = dict(scope.get("state") or {})
        state[STATE_KEY] = verified
        inner = dict(scope)
        inner["state"] = state
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(inner, replay, send)

    async def _reject(
        self, error: SignatureError, scope: Scope, send: Send, *, status: int
    ) -> None:
        if self.on_reject is not None:
            self.on_reject(error, scope)
        payload = json.dumps(
            {"error": {"reason": error.reason, "message": error.message}}, separators=(",", ":")
        ).encode("utf-8")
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode("ascii")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

"""Who may use the HTTP API: bearer tokens with a role, stored only as SHA-256 hashes, and the
fingerprint that ties an Idempotency-Key to one request."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from typing import Any

from keyturn.domain.errors import KeyturnError
from keyturn.domain.model import ApiToken, Role
from keyturn.ports import AccessStore, Clock

#: Every token starts with this, so a scanner (and a human) can tell one when it sees it.
TOKEN_PREFIX = "kt_"  # noqa: S105 (a prefix, not a secret)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise KeyturnError(f"--role {text!r} is not known; use one of {known}") from None


def create_token(
    store: AccessStore, clock: Clock, *, name: str, role: Role, actor: str
) -> tuple[ApiToken, str]:
    """A new token: its stored record and the token itself (shown once, never stored)."""
    if not _NAME.fullmatch(name):
        raise KeyturnError(
            f"--name {name!r} is not a token name: 1 to 64 letters, digits, '.', '_', '@' or "
            "'-', starting with a letter or digit"
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    record = ApiToken(
        name=name,
        role=role,
        token_hash=token_hash(token),
        created_at=clock.now(),
        created_by=actor,
    )
    store.add_token(record)
    return record, token


def authenticate(store: AccessStore, token: str) -> ApiToken | None:
    """The live token record for `token`; None when it is unknown or revoked."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    found = store.token_by_hash(token_hash(token))
    if found is None or found.revoked_at is not None:
        return None
    return found


def fingerprint(method: str, path: str, body: Any) -> str:
    """What the same Idempotency-Key must be sent with again: method, path and body (keys
    sorted, so a re-serialised body is the same request)."""
    text = json.dumps([method.upper(), path, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()

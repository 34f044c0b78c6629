"""What the passkey user pages and the passkey kind's steps agree on.

keyturn never holds a passkey: every write for an end user is signed by the user's authenticator
in the user's browser. So the user pages (served by ``keyturn serve``'s user listener) make the
user's writes at the provider, relaying challenges, and record *evidence* on the rotation; the
kind's steps (run by workers) are waits that observe the provider and that evidence.

- The new passkey is named :func:`passkey_name` at the provider: a page that finds one of that
  name for the user does not register another (exactly one new passkey, whatever was killed
  when).
- Evidence names (each recorded once per rotation; the first detail is kept):
  :data:`REGISTERED`, :data:`PROVEN`, :data:`OLD_DEACTIVATED`, :data:`ROLLED_BACK`,
  :data:`SNOOZED` (``snoozed:1``, ``snoozed:2``, ...).
- A link token is ``<rotation id>.<secret>``: the rotation id finds the rotation, the SHA-256 of
  the whole token (:func:`link_hash`) is compared with the one stored in the rotation's data.
  Only the hash is stored in clear; the token itself is sealed (it reaches the user through the
  notification outbox, encrypted until a sink sends it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from keyturn.plugin import KeyturnError

REGISTERED = "registered"
PROVEN = "proven"
OLD_DEACTIVATED = "old_deactivated"
ROLLED_BACK = "rolled_back"
SNOOZED = "snoozed"
#: Recorded by `keyturn passkeys cutover` on every rotation of a domain-move campaign.
CUTOVER = "cutover"

Task = Literal["enrol", "deactivate", "rollback"]


def passkey_name(rotation_id: str) -> str:
    """The provider-side name of the passkey a rotation registers."""
    return f"keyturn {rotation_id}"


def new_link_token(rotation_id: str) -> str:
    return f"{rotation_id}.{secrets.token_urlsafe(32)}"


def link_rotation(token: str) -> str | None:
    """The rotation id a link token names (None: not a link token)."""
    rotation_id, dot, rest = token.partition(".")
    if not dot or not rotation_id or len(rest) < 32 or len(token) > 200:
        return None
    return rotation_id


def link_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def link_matches(token: str, stored_hash: str | None) -> bool:
    return stored_hash is not None and hmac.compare_digest(link_hash(token), stored_hash)


class LinkRefused(KeyturnError):
    """A link (or a page session of one) that cannot be used; the message is one line for the
    person holding it (never the token)."""


@dataclass(frozen=True)
class LinkTask:
    """What a user's link asks for now, from the rotation as stored (a fresh read each time)."""

    rotation_id: str
    #: The end user (the provider's username) and the provider's user id, if known.
    username: str
    user_id: str | None
    #: The passkey being replaced.
    old_credential_uuid: str
    old_credential_id: str
    #: "enrol": sign in with the old passkey, register the new one and prove it (then, when
    #: `may_deactivate`, deactivate the old one in the same visit); "deactivate": sign in with
    #: the new passkey and deactivate the old one; "rollback": reactivate the old passkey and
    #: deactivate the new one.
    task: Task
    #: The origin of the user pages where this link is opened, and the new domain's origin for
    #: a domain move (None: the new passkey is registered where the old one lives).
    origin: str
    new_origin: str | None
    #: False while a domain move waits for its cutover: the old passkey stays active.
    may_deactivate: bool
    #: The new passkey, once the provider has it.
    new_credential_uuid: str | None
    new_credential_id: str | None
    #: The evidence names recorded so far.
    evidence: frozenset[str]
    expires_at: datetime
    #: The hash of the link that is valid now (a page session holds the hash of the link it
    #: was opened with; a different one means that link was superseded).
    link_hash: str
    #: The rotation is over, ended by this task's own last step (the old passkey off, or the
    #: change undone): an open page session shows "done" and offers no step. A link is never
    #: opened on a finished rotation.
    finished: bool = False


class PasskeyTasks(Protocol):
    """What the user pages need from keyturn (the kind implements it over its services)."""

    async def open_link(self, token: str) -> LinkTask:
        """The task of a link token: LinkRefused when the token is unknown, superseded, expired,
        or its rotation is finished, paused or cancelled. Changes nothing."""

    async def task(self, rotation_id: str) -> LinkTask:
        """The task now, for an open page session (LinkRefused when it is no longer
        actionable; ``finished`` when the user's last step just ended the rotation, so the
        page that reloads after it says "done" even once a worker has finished it)."""

    async def record(self, rotation_id: str, name: str, detail: Mapping[str, Any]) -> bool:
        """Record evidence `name` on the rotation (once: False when it was already there) and
        wake the rotation so a worker looks at it at once. `detail`: ids and origins only."""

    async def provider(self, rotation_id: str) -> Any:
        """A provider session as the credential that signs this rotation's provider calls (it
        logs users in by delegation). The caller closes it (``await session.aclose()``)."""

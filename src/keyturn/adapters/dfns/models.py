"""Typed results of the Dfns client, parsed leniently from the API's JSON.

A required field that is missing raises :class:`MissingField` (the client turns it into
DfnsBadResponse naming the call); unknown fields are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class MissingField(Exception):
    """A required field is absent from a response (internal; the client wraps it)."""

    def __init__(self, what: str, name: str) -> None:
        self.what = what
        self.name = name
        super().__init__(f"{what} without {name!r}")


def _req(data: Mapping[str, Any], what: str, name: str) -> str:
    value = data.get(name)
    if value is None or value == "":
        raise MissingField(what, name)
    return str(value)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _opt(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    return None if value is None else str(value)


class WebhookSecret:
    """A webhook's signing secret, returned once by Create Webhook. Masked in repr and str."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: store it (sealed) or hand it to the receiver; never log it."""
        return self._value

    def __repr__(self) -> str:
        return "WebhookSecret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WebhookSecret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("WebhookSecret", self._value))


class DelegatedToken:
    """A user's access token from Delegated Login. It reads as the user (writes still need the
    user's own signature); masked in repr and str, and it cannot be pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The token itself: use it as a bearer (DfnsClient.as_user); never log or store it."""
        return self._value

    def __repr__(self) -> str:
        return "DelegatedToken('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DelegatedToken) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("DelegatedToken", self._value))

    def __reduce__(self) -> Any:
        raise TypeError("a DelegatedToken is a credential and cannot be pickled")


def _ids(entries: object) -> tuple[str, ...]:
    if not isinstance(entries, list):
        return ()
    return tuple(str(e["id"]) for e in entries if isinstance(e, Mapping) and e.get("id"))


@dataclass(frozen=True)
class UserActionChallenge:
    """A user-action challenge (`POST /auth/action/init`) to be signed, possibly elsewhere:
    `raw` is the whole response, to hand to the user's browser or device as it came."""

    challenge: str
    challenge_identifier: str
    rp_id: str | None = None
    user_verification: str | None = None
    allowed_keys: tuple[str, ...] = ()
    allowed_passkeys: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> UserActionChallenge:
        allowed = _mapping(data.get("allowCredentials"))
        return cls(
            challenge=_req(data, "user-action challenge", "challenge"),
            challenge_identifier=_req(data, "user-action challenge", "challengeIdentifier"),
            rp_id=_opt(_mapping(data.get("rp")), "id"),
            user_verification=_opt(data, "userVerification"),
            allowed_keys=_ids(allowed.get("key")),
            allowed_passkeys=_ids(allowed.get("webauthn")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class Credential:
    credential_id: str
    credential_uuid: str
    kind: str
    name: str
    is_active: bool
    public_key: str = field(repr=False)
    date_created: str | None = None
    relying_party_id: str | None = None
    origin: str | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Credential:
        return cls(
            credential_id=_req(data, "credential", "credentialId"),
            credential_uuid=_req(data, "credential", "credentialUuid"),
            kind=str(data.get("kind") or "Key"),
            name=str(data.get("name") or ""),
            is_active=bool(data.get("isActive", False)),
            public_key=str(data.get("publicKey") or ""),
            date_created=_opt(data, "dateCreated"),
            relying_party_id=_opt(data, "relyingPartyId"),
            origin=_opt(data, "origin"),
        )


@dataclass(frozen=True)
class CredentialChallenge:
    """A Create Credential challenge (also from Challenge With Code)."""

    kind: str
    challenge_identifier: str
    challenge: str
    rp_id: str | None = None
    rp_name: str | None = None
    user_id: str | None = None
    user_name: str | None = None
    #: The whole response (for Fido2: the creation options a browser needs, as they came).
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> CredentialChallenge:
        rp = _mapping(data.get("rp"))
        user = _mapping(data.get("user"))
        return cls(
            kind=str(data.get("kind") or "Key"),
            challenge_identifier=_req(data, "credential challenge", "challengeIdentifier"),
            challenge=_req(data, "credential challenge", "challenge"),
            rp_id=_opt(rp, "id"),
            rp_name=_opt(rp, "name"),
            user_id=_opt(user, "id"),
            user_name=_opt(user, "name"),
            raw=dict(data),
        )


@dataclass(frozen=True)
class CredentialCode:
    """A one-time code that lets a new credential be added without authentication. The code
    itself grants that, so it is masked in repr."""

    code: str = field(repr=False)
    expiration: str | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> CredentialCode:
        return cls(code=_req(data, "credential code", "code"), expiration=_opt(data, "expiration"))


@dataclass(frozen=True)
class Webhook:
    id: str
    url: str
    events: tuple[str, ...]
    status: str
    description: str | None = None
    date_created: str | None = None
    date_updated: str | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Webhook:
        events = data.get("events") or ()
        return cls(
            id=_req(data, "webhook", "id"),
            url=str(data.get("url") or ""),
            events=tuple(str(e) for e in events) if isinstance(events, list | tuple) else (),
            status=str(data.get("status") or ""),
            description=_opt(data, "description"),
            date_created=_opt(data, "dateCreated"),
            date_updated=_opt(data, "dateUpdated"),
        )

    @property
    def enabled(self) -> bool:
        return self.status == "Enabled"


@dataclass(frozen=True)
class PingResult:
    """The outcome of a test delivery: the receiver's HTTP status as a string, and an error."""

    status: str
    error: str | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> PingResult:
        return cls(status=str(data.get("status") or ""), error=_opt(data, "error"))

    @property
    def ok(self) -> bool:
        return self.status == "200" and not self.error


@dataclass(frozen=True)
class WebhookEvent:
    """One delivery record of a webhook event."""

    id: str
    kind: str
    status: str | None = None
    date: str | None = None
    timestamp_sent: int | float | None = None
    delivery_attempt: int | None = None
    retry_of: str | None = None
    data: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> WebhookEvent:
        ts = data.get("timestampSent")
        attempt = data.get("deliveryAttempt")
        payload = data.get("data")
        return cls(
            id=_req(data, "webhook event", "id"),
            kind=str(data.get("kind") or ""),
            status=_opt(data, "status"),
            date=_opt(data, "date"),
            timestamp_sent=ts if isinstance(ts, int | float) and not isinstance(ts, bool) else None,
            delivery_attempt=attempt if isinstance(attempt, int) else None,
            retry_of=_opt(data, "retryOf"),
            data=dict(payload) if isinstance(payload, Mapping) else {},
        )


@dataclass(frozen=True)
class WebhookEventPage:
    items: list[WebhookEvent]
    next_page_token: str | None = None

"""The Dfns-compatible Starlette application.

Every Dfns route goes through one pipeline (`Sandbox.handle`): count, inject faults, check the
bearer token, parse the body, check the user action for signed calls, run the handler (which
commits before returning), then maybe "apply then fail". The rules follow
/work/shared/dfns-api.md ("the sandbox's rules" and "SDK differences").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import string
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keyturn.sandbox.crypto import (
    KeyError_,
    b64url_decode,
    generate_private_key,
    load_public_key,
    make_jwt,
    new_id,
    random_token,
    read_jwt,
    unverified_org,
    verify_key_attestation,
)
from keyturn.sandbox.faults import DROP, FaultConfig, FaultConfigError, Faults
from keyturn.sandbox.store import (
    Conflict,
    Credential,
    Fido2State,
    Principal,
    RelyingParties,
    Store,
    TokenRecord,
    Webhook,
)
from keyturn.sandbox.webauthn import (
    Registration,
    WebAuthnError,
    rp_id_for_origin,
    user_handle_matches,
    validate_relying_parties,
    verify_assertion,
    verify_registration,
)
from keyturn.sandbox.webhooks import Deliveries, utc_now_iso

T = TypeVar("T")

RP = {"id": "sandbox.keyturn.local", "name": "keyturn Dfns sandbox"}
ORIGIN = "http://sandbox.keyturn.local"
#: Where passkeys live unless --webauthn-origin / --webauthn-rp-id (or /_sandbox/) say otherwise.
PASSKEY_ORIGIN = "https://sandbox.keyturn.local"
PASSKEY_RP_ID = "sandbox.keyturn.local"
#: A credential code lives at most this long (before --time-scale).
CODE_MAX_TTL = 60.0
WEBHOOK_LIMIT = 5
CHALLENGE_TTL = 300.0
USER_ACTION_TTL = 600.0
DROP_SCOPE_KEY = "keyturn.sandbox.drop"


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None
) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "id": new_id("err", 8),
                "status": status,
                "code": code,
                "message": message,
                "details": details or {},
            }
        },
        status_code=status,
    )


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


# ---------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class Caller:
    token: TokenRecord
    principal: Principal

    @property
    def org_id(self) -> str:
        return self.principal.org_id


@dataclass
class Ctx:
    request: Request
    caller: Caller | None
    body: Any
    params: dict[str, str]

    @property
    def who(self) -> Caller:
        assert self.caller is not None, "route requires authentication"
        return self.caller

    def field(self, name: str, kind: type[T], *, required: bool = True) -> T | None:
        if not isinstance(self.body, dict):
            if required:
                raise bad_request(f"the request body must be a JSON object with {name!r}")
            return None
        value = self.body.get(name)
        if value is None:
            if required:
                raise bad_request(f"missing required field {name!r} in the request body")
            return None
        if not isinstance(value, kind):
            raise bad_request(f"field {name!r} must be a {kind.__name__}")
        return value

    def need(self, name: str, kind: type[T]) -> T:
        value = self.field(name, kind)
        assert value is not None
        return value


Handler = Callable[[Ctx], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True)
class RouteSpec:
    method: str
    template: str
    handler: Handler
    auth: bool = True
    signed: bool = False
    mutating: bool = False

    @property
    def key(self) -> str:
        return f"{self.method} {self.template}"


@dataclass
class ActionChallenge:
    identifier: str
    challenge: str
    principal_id: str
    method: str
    path: str
    payload: Any
    expires: float


@dataclass
class UserActionGrant:
    principal_id: str
    method: str
    path: str
    payload: Any
    expires: float


@dataclass
class CredentialChallenge:
    identifier: str
    challenge: str
    org_id: str
    principal_id: str
    kind: str
    via_code: bool
    expires: float


@dataclass
class Counters:
    requests: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )

    #: The newest requests in arrival order (sequence number, route, status): what a test
    #: compares a plan with, call for call. Bounded; not persisted.
    log: deque[tuple[int, str, int]] = field(default_factory=lambda: deque(maxlen=100_000))
    seq: int = 0

    def count(self, key: str, status: int) -> None:
        self.requests[key][str(status)] += 1
        self.seq += 1
        self.log.append((self.seq, key, status))

    def since(self, after: int) -> list[dict[str, Any]]:
        return [
            {"seq": n, "route": key, "status": status} for n, key, status in self.log if n > after
        ]

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.requests.items()}


_ABSENT = object()


def normalise_payload(value: Any) -> Any:
    """Parsed JSON for comparison: an empty object and an absent body are the same."""
    if value is None or value == {}:
        return _ABSENT
    return value


def parse_signed_payload(text: str) -> Any:
    if text.strip() == "":
        return _ABSENT
    try:
        return normalise_payload(json.loads(text))
    except ValueError:
        return ("unparsed", text)


# ---------------------------------------------------------------------------------- sandbox


@dataclass
class SandboxSettings:
    state_dir: Path
    service_accounts: int = 1
    event_rate: float = 0.0
    time_scale: float = 1.0
    faults: FaultConfig = field(default_factory=FaultConfig)
    #: End users (one passkey each) created at bootstrap; their authenticator state (with the
    #: passkeys' private keys) goes to `authenticator_state`, which must lie outside state_dir.
    end_users: int = 0
    authenticator_state: Path | None = None
    #: The organisation's allowed WebAuthn origins and rpIds; empty keeps what is stored.
    webauthn_origins: list[str] = field(default_factory=list)
    webauthn_rp_ids: list[str] = field(default_factory=list)
    #: "required" or "preferred"; None keeps what is stored.
    user_verification: str | None = None


class Sandbox:
    def __init__(self, settings: SandboxSettings) -> None:
        if settings.time_scale <= 0:
            raise ValueError("--time-scale must be greater than 0")
        if settings.service_accounts < 1:
            raise ValueError("--service-accounts must be at least 1")
        if settings.end_users < 0:
            raise ValueError("--end-users must be zero or more")
        if settings.end_users and settings.authenticator_state is None:
            raise ValueError("--end-users needs --authenticator-state FILE (outside --state-dir)")
        if settings.authenticator_state is not None:
            state_dir = settings.state_dir.resolve()
            target = settings.authenticator_state.resolve()
            if target == state_dir or state_dir in target.parents:
                raise ValueError(
                    "--authenticator-state must lie outside --state-dir: the sandbox's own files"
                    " never hold a passkey's private key"
                )
        if settings.user_verification not in (None, "required", "preferred"):
            raise ValueError('--user-verification must be "required" or "preferred"')
        self.settings = settings
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.state_dir / "sandbox.sqlite3")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                (settings.state_dir / f"sandbox.sqlite3{suffix}").chmod(0o600)
        self._bootstrap_if_needed()
        secret = self.store.get_meta("jwt_secret")
        org = self.store.get_meta("org_id")
        assert secret is not None and org is not None
        self.jwt_secret = bytes.fromhex(secret)
        self.org_id = org
        self.tokens = self.store.tokens()
        self.principals = self.store.principals()
        self.relying_parties = self._relying_parties_at_start()
        self.faults = Faults(settings.faults)
        self.counters = Counters()
        self.deliveries = Deliveries(self.store, time_scale=settings.time_scale)
        self.deliveries.webhooks = {w.id: w for w in self.store.webhooks()}
        self.action_challenges: dict[str, ActionChallenge] = {}
        self.user_actions: dict[str, UserActionGrant] = {}
        self.spent_user_actions: dict[str, float] = {}
        self.credential_challenges: dict[str, CredentialChallenge] = {}

    # ------------------------------------------------------------------------------ bootstrap

    def _bootstrap_if_needed(self) -> None:
        if self.store.get_meta("org_id") is not None:
            return
        org_id = new_id("or", 8)
        secret = secrets.token_bytes(32)
        now = utc_now_iso()
        principals: list[Principal] = []
        tokens: list[TokenRecord] = []
        credentials: list[Credential] = []
        doc: dict[str, Any] = {"org_id": org_id}

        def add(role: str, kind: str, token_kind: str, name: str, algorithm: str) -> dict[str, Any]:
            principal = Principal(new_id("us", 8), org_id, kind, name)
            token = TokenRecord(new_id("to", 8), org_id, token_kind, principal.id, name)
            private_pem, public_pem = generate_private_key(algorithm)
            credential = Credential(
                uuid=new_id("cr", 10),
                credential_id=random_token(24),
                org_id=org_id,
                principal_id=principal.id,
                kind="Key",
                name=f"{name} bootstrap key",
                public_key=public_pem,
                algorithm=algorithm,
                is_active=True,
                date_created=now,
                origin=ORIGIN,
                relying_party_id=RP["id"],
            )
            principals.append(principal)
            tokens.append(token)
            credentials.append(credential)
            return {
                "name": name,
                "token": make_jwt(self._claims(token), secret),
                "credential_id": credential.credential_id,
                "credential_uuid": credential.uuid,
                "private_key_pem": private_pem,
                "principal_id": principal.id,
                "token_id": token.id,
                "algorithm": algorithm,
            }

        accounts = [
            add("service_account", "ServiceAccount", "Service", f"sandbox-sa-{i + 1}", "ed25519")
            for i in range(self.settings.service_accounts)
        ]
        doc["service_account"] = accounts[0]
        doc["service_accounts"] = accounts
        doc["pat"] = add("pat", "User", "Pat", "pat-owner@sandbox.local", "ecdsa-p256")
        doc["user"] = add("user", "User", "User", "user@sandbox.local", "ed25519")
        relying_parties = self._start_relying_parties(org_id, None)
        fido2: list[Fido2State] = []
        if self.settings.end_users:
            doc["end_users"] = self._bootstrap_end_users(
                org_id, relying_parties, principals, credentials, fido2
            )
            doc["authenticator_state"] = str(self.settings.authenticator_state)
        self.store.bootstrap(
            meta={"org_id": org_id, "jwt_secret": secret.hex(), "bootstrap": json.dumps(doc)},
            principals=principals,
            tokens=tokens,
            credentials=credentials,
            fido2=fido2,
            relying_parties=relying_parties,
        )

    def _bootstrap_end_users(
        self,
        org_id: str,
        rp: RelyingParties,
        principals: list[Principal],
        credentials: list[Credential],
        fido2: list[Fido2State],
    ) -> list[dict[str, Any]]:
        """N end users with one passkey each, made by a software authenticator whose state
        (private keys included) goes to the authenticator state file, never to the sandbox's
        own files. Each passkey goes through the same verification as one registered over HTTP.
        """
        from keyturn.testing.authenticator import SoftwareAuthenticator

        assert self.settings.authenticator_state is not None
        device = SoftwareAuthenticator()
        origin, rp_id = rp.origins[0], rp_id_for_origin(rp.origins[0], rp.origins, rp.rp_ids)
        users: list[dict[str, Any]] = []
        now = utc_now_iso()
        for i in range(self.settings.end_users):
            principal = Principal(
                new_id("us", 8), org_id, "EndUser", f"end-user-{i + 1}@sandbox.local"
            )
            challenge = random_token(32)
            info = device.make_credential(
                rp_id=rp_id,
                origin=origin,
                challenge=challenge,
                user_id=principal.id,
                user_name=principal.name,
                attestation="packed" if i % 2 else "none",
            )
            registration = verify_registration(
                cred_id=info["credId"],
                client_data_b64=info["clientData"],
                attestation_b64=info["attestationData"],
                challenge=challenge,
                origins=rp.origins,
                rp_ids=rp.rp_ids,
                require_uv=rp.user_verification == "required",
            )
            credential = self._fido2_credential(
                org_id, principal.id, "bootstrap passkey", registration, now
            )
            principals.append(principal)
            credentials.append(credential)
            fido2.append(self._fido2_state(credential.uuid, registration))
            users.append(
                {
                    "username": principal.name,
                    "user_id": principal.id,
                    "credential_id": credential.credential_id,
                    "credential_uuid": credential.uuid,
                    "rp_id": registration.rp_id,
                    "origin": registration.origin,
                }
            )
        device.save(self.settings.authenticator_state)
        return users

    @staticmethod
    def _fido2_credential(
        org_id: str, principal_id: str, name: str, registration: Registration, now: str
    ) -> Credential:
        return Credential(
            uuid=new_id("cr", 10),
            credential_id=registration.credential_id,
            org_id=org_id,
            principal_id=principal_id,
            kind="Fido2",
            name=name,
            public_key=registration.public_key_pem,
            algorithm=registration.algorithm,
            is_active=True,
            date_created=now,
            origin=registration.origin,
            relying_party_id=registration.rp_id,
        )

    @staticmethod
    def _fido2_state(uuid: str, registration: Registration) -> Fido2State:
        return Fido2State(
            uuid=uuid,
            sign_count=registration.sign_count,
            aaguid=registration.aaguid,
            attestation_format=registration.attestation_format,
        )

    # ------------------------------------------------------------------------ relying parties

    def _start_relying_parties(self, org_id: str, stored: RelyingParties | None) -> RelyingParties:
        """The start settings over what is stored (or the defaults); ValueError if invalid."""
        settings = self.settings
        origins = settings.webauthn_origins or (stored.origins if stored else [PASSKEY_ORIGIN])
        rp_ids = settings.webauthn_rp_ids or (stored.rp_ids if stored else [PASSKEY_RP_ID])
        uv = settings.user_verification or (stored.user_verification if stored else "required")
        try:
            clean_origins, clean_rp_ids = validate_relying_parties(origins, rp_ids)
        except WebAuthnError as exc:
            raise ValueError(exc.message) from None
        return RelyingParties(org_id, clean_origins, clean_rp_ids, uv)

    def _relying_parties_at_start(self) -> dict[str, RelyingParties]:
        stored = self.store.relying_parties(self.org_id)
        current = self._start_relying_parties(self.org_id, stored)
        if current != stored:
            self.store.put_relying_parties(current)
        return {self.org_id: current}

    def rp_of(self, org_id: str) -> RelyingParties:
        return self.relying_parties[org_id]

    def rp_entity(self, org_id: str, request: Request) -> dict[str, str]:
        """The `rp` to offer: the rpId usable from the request's Origin, else the default."""
        rp = self.rp_of(org_id)
        rp_id = rp_id_for_origin(request.headers.get("origin"), rp.origins, rp.rp_ids)
        return {"id": rp_id, "name": RP["name"]}

    @staticmethod
    def _claims(token: TokenRecord) -> dict[str, Any]:
        return {
            "iss": "https://sandbox.keyturn.local/",
            "aud": "https://api.dfns.io",
            "sub": token.principal_id,
            "jti": token.id,
            "iat": int(time.time()),
            "https://custom/username": token.name,
            "https://custom/app_metadata": {
                "orgId": token.org_id,
                "tokenId": token.id,
                "tokenKind": token.kind,
                "userId": token.principal_id,
            },
        }

    def bootstrap_document(self, base_url: str) -> dict[str, Any]:
        stored = self.store.get_meta("bootstrap")
        assert stored is not None
        doc: dict[str, Any] = {"base_url": base_url}
        doc.update(json.loads(stored))
        return doc

    # ---------------------------------------------------------------------------------- utils

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args))

    def authenticate(self, request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "unauthorized",
                "missing bearer token; send Authorization: Bearer <service account or PAT token>",
            )
        payload = read_jwt(token.strip(), self.jwt_secret)
        record = self.tokens.get(str(payload.get("jti"))) if payload else None
        principal = self.principals.get(record.principal_id) if record else None
        if record is None or principal is None:
            raise ApiError(
                401, "unauthorized", "invalid bearer token; use a token issued by this sandbox"
            )
        return Caller(record, principal)

    def _prune(self) -> None:
        now = time.monotonic()
        for table in (self.action_challenges, self.user_actions, self.credential_challenges):
            if len(table) > 1000:
                for key in [k for k, v in table.items() if v.expires < now]:
                    table.pop(key, None)
        if len(self.spent_user_actions) > 10000:
            for key in [k for k, v in self.spent_user_actions.items() if v < now]:
                self.spent_user_actions.pop(key, None)

    # ------------------------------------------------------------------------------ pipeline

    async def handle(self, spec: RouteSpec, request: Request) -> Response:
        try:
            response = await self._pipeline(spec, request)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.details)
        self.counters.count(spec.key, response.status_code)
        return response

    async def _pipeline(self, spec: RouteSpec, request: Request) -> Response:  # noqa: C901
        config = self.faults.config
        concrete = f"{request.method} {request.url.path}"
        faulty = self.faults.applies(spec.key, concrete)
        if faulty and config.latency_ms > 0:
            await asyncio.sleep(config.latency_ms / 1000.0)
        header = request.headers.get("authorization", "")
        org = unverified_org(header.partition(" ")[2].strip()) or "anonymous"
        if self.faults.over_rate_limit(org):
            self.faults.counters.rate_limited += 1
            raise ApiError(
                429,
                "rate_limited",
                f"rate limit of {config.rate_limit_per_minute} requests per minute exceeded;"
                " back off and retry",
            )
        if faulty:
            if self.faults.roll(config.hang_rate):
                self.faults.counters.hang += 1
                await asyncio.sleep(config.hang_seconds)
                raise ApiError(500, "internal_error", "injected fault: hung, then failed")
            if self.faults.roll(config.error_rate):
                self.faults.counters.error_500 += 1
                raise ApiError(500, "internal_error", "injected fault: internal server error")
            if self.faults.roll(config.rate_429):
                self.faults.counters.rate_429 += 1
                raise ApiError(429, "rate_limited", "injected fault: too many requests")

        caller = self.authenticate(request) if spec.auth else None
        raw = await request.body()
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                raise bad_request("the request body is not valid JSON") from None
        if spec.signed:
            assert caller is not None
            self._spend_user_action(request, caller, body)
        ctx = Ctx(request, caller, body, dict(request.path_params))
        status, payload = await spec.handler(ctx)

        if (
            spec.mutating
            and faulty
            and 200 <= status < 300
            and self.faults.roll(self.faults.config.apply_then_fail_rate)
        ):
            self.faults.counters.apply_then_fail += 1
            if self.faults.config.apply_then_fail_mode == DROP:
                drop = request.scope.get(DROP_SCOPE_KEY)
                if drop is not None:
                    await drop()
            raise ApiError(
                500, "internal_error", "injected fault: the change was applied, then failed"
            )
        return JSONResponse(payload, status_code=status)

    def _spend_user_action(self, request: Request, caller: Caller, body: Any) -> None:
        token = request.headers.get("x-dfns-useraction", "").strip()
        if not token:
            raise ApiError(
                403,
                "forbidden",
                "missing X-DFNS-USERACTION header; sign this request via /auth/action first",
            )
        if token in self.spent_user_actions:
            raise ApiError(
                400, "user_action_reused", "user action has already been used; sign again"
            )
        grant = self.user_actions.pop(token, None)
        if grant is None or grant.expires < time.monotonic():
            raise ApiError(
                403, "forbidden", "invalid or expired X-DFNS-USERACTION; sign this request again"
            )
        self.spent_user_actions[token] = time.monotonic() + USER_ACTION_TTL * 2
        if grant.principal_id != caller.principal.id:
            raise ApiError(403, "forbidden", "the user action was signed for another caller")
        if grant.method != request.method.upper() or grant.path != request.url.path:
            raise ApiError(
                403,
                "forbidden",
                f"the user action was signed for {grant.method} {grant.path},"
                f" not {request.method.upper()} {request.url.path}",
            )
        if grant.payload != normalise_payload(body):
            raise ApiError(
                403, "forbidden", "the request body differs from the payload the user action signed"
            )

    # ------------------------------------------------------------------------- user actions

    async def action_init(self, ctx: Ctx) -> tuple[int, Any]:
        payload = ctx.field("userActionPayload", str, required=False)
        method = ctx.need("userActionHttpMethod", str).upper()
        path = ctx.need("userActionHttpPath", str)
        if not path.startswith("/"):
            raise bad_request("userActionHttpPath must be the request's pathname, e.g. /webhooks")
        path = path.split("?", 1)[0]
        self._prune()
        challenge = ActionChallenge(
            identifier=new_id("ch", 16),
            challenge=random_token(32),
            principal_id=ctx.who.principal.id,
            method=method,
            path=path,
            payload=parse_signed_payload(payload or ""),
            expires=time.monotonic() + CHALLENGE_TTL,
        )
        self.action_challenges[challenge.identifier] = challenge
        credentials = await self.db(self.store.list_credentials, ctx.who.principal.id)
        allowed = [
            {"type": "public-key", "id": c.credential_id}
            for c in credentials
            if c.is_active and c.kind == "Key"
        ]
        passkeys = [
            {"type": "public-key", "id": c.credential_id}
            for c in credentials
            if c.is_active and c.kind == "Fido2"
        ]
        kinds = [{"kind": "Key", "factor": "first", "requiresSecondFactor": False}]
        rp: dict[str, str] = dict(RP)
        user_verification = "required"
        if passkeys or ctx.who.principal.kind == "EndUser":
            kinds.append({"kind": "Fido2", "factor": "first", "requiresSecondFactor": False})
            rp = self.rp_entity(ctx.who.org_id, ctx.request)
            user_verification = self.rp_of(ctx.who.org_id).user_verification
        return 200, {
            "challenge": challenge.challenge,
            "challengeIdentifier": challenge.identifier,
            "supportedCredentialKinds": kinds,
            "rp": rp,
            "userVerification": user_verification,
            "attestation": "direct",
            "externalAuthenticationUrl": "",
            "allowCredentials": {
                "key": allowed,
                "passwordProtectedKey": [],
                "webauthn": passkeys,
            },
        }

    async def action_sign(self, ctx: Ctx) -> tuple[int, Any]:
        identifier = ctx.need("challengeIdentifier", str)
        challenge = self.action_challenges.pop(identifier, None)
        if challenge is None or challenge.expires < time.monotonic():
            raise bad_request(
                "unknown or already used challengeIdentifier; call /auth/action/init again"
            )
        if challenge.principal_id != ctx.who.principal.id:
            raise bad_request("this challenge was issued to another caller")
        first = ctx.need("firstFactor", dict)
        if first.get("kind") not in ("Key", "Fido2"):
            raise bad_request('firstFactor.kind must be "Key" or "Fido2"')
        assertion = first.get("credentialAssertion")
        if not isinstance(assertion, dict):
            raise bad_request("firstFactor.credentialAssertion must be an object")
        if first.get("kind") == "Fido2":
            await self._check_fido2_assertion(ctx, challenge, assertion)
        else:
            await self._check_key_assertion(ctx, challenge, assertion)
        return 200, {"userAction": self._grant(challenge)}

    async def _check_key_assertion(
        self, ctx: Ctx, challenge: ActionChallenge, assertion: dict[str, Any]
    ) -> None:
        cred_id, client_data_b64, signature_b64 = (
            assertion.get("credId"),
            assertion.get("clientData"),
            assertion.get("signature"),
        )
        if not all(isinstance(v, str) for v in (cred_id, client_data_b64, signature_b64)):
            raise bad_request("credentialAssertion needs credId, clientData and signature strings")
        assert isinstance(cred_id, str) and isinstance(client_data_b64, str)
        assert isinstance(signature_b64, str)
        credential = await self.db(self.store.credential_by_cred_id, cred_id)
        if credential is None or credential.principal_id != ctx.who.principal.id:
            raise ApiError(401, "unauthorized", "unknown credential for this caller")
        if not credential.is_active:
            raise ApiError(
                401, "unauthorized", "the credential is deactivated; sign with an active one"
            )
        try:
            client_data = b64url_decode(client_data_b64)
            parsed = json.loads(client_data)
            signature = b64url_decode(signature_b64)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(
                401, "unauthorized", "clientData or signature is not valid base64url/JSON"
            ) from None
        if (
            not isinstance(parsed, dict)
            or parsed.get("type") != "key.get"
            or not secrets.compare_digest(str(parsed.get("challenge", "")), challenge.challenge)
        ):
            raise ApiError(
                401, "unauthorized", 'clientData must have type "key.get" and this challenge'
            )
        if credential.kind != "Key":
            raise ApiError(
                401, "unauthorized", f'credential {cred_id} is a {credential.kind}; sign as "Fido2"'
            )
        public_key = load_public_key(credential.public_key)
        if not public_key.verify(signature, client_data):
            raise ApiError(401, "unauthorized", "the signature does not verify for this credential")

    def _grant(self, challenge: ActionChallenge) -> str:
        token = "ua-" + random_token(32)
        self._prune()
        self.user_actions[token] = UserActionGrant(
            principal_id=challenge.principal_id,
            method=challenge.method,
            path=challenge.path,
            payload=challenge.payload,
            expires=time.monotonic() + USER_ACTION_TTL,
        )
        return token

    async def _check_fido2_assertion(
        self, ctx: Ctx, challenge: ActionChallenge, assertion: dict[str, Any]
    ) -> None:
        """A passkey's WebAuthn assertion over this challenge (401 naming the failed check)."""
        fields = ("credId", "clientData", "authenticatorData", "signature")
        values = [assertion.get(f) for f in fields]
        if not all(isinstance(v, str) and v for v in values):
            raise bad_request(
                "a Fido2 credentialAssertion needs credId, clientData, authenticatorData and"
                " signature strings (base64url)"
            )
        cred_id, client_data, authenticator_data, signature = (str(v) for v in values)
        credential = await self.db(self.store.credential_by_cred_id, cred_id)
        if credential is None or credential.principal_id != ctx.who.principal.id:
            raise ApiError(
                401, "unauthorized", "unknown credential for this caller", {"check": "credential"}
            )
        if credential.kind != "Fido2":
            raise ApiError(
                401,
                "unauthorized",
                f'credential {cred_id} is a {credential.kind} credential; sign as "Key"',
                {"check": "credential"},
            )
        if not credential.is_active:
            raise ApiError(
                401,
                "unauthorized",
                "the passkey is deactivated; sign with an active one",
                {"check": "credential"},
            )
        state = await self.db(self.store.fido2_state, credential.uuid)
        if state is None:
            raise ApiError(500, "internal_error", "the passkey's counter state is missing")
        user_handle = assertion.get("userHandle")
        if user_handle and (
            not isinstance(user_handle, str)
            or not user_handle_matches(user_handle, credential.principal_id)
        ):
            raise ApiError(
                401, "unauthorized", "userHandle names another user", {"check": "user_handle"}
            )
        rp = self.rp_of(credential.org_id)
        try:
            verified = verify_assertion(
                public_key_pem=credential.public_key,
                rp_id=credential.relying_party_id,
                stored_sign_count=state.sign_count,
                client_data_b64=client_data,
                authenticator_data_b64=authenticator_data,
                signature_b64=signature,
                challenge=challenge.challenge,
                origins=rp.origins,
                rp_ids=rp.rp_ids,
                require_uv=rp.user_verification == "required",
            )
        except WebAuthnError as exc:
            raise ApiError(401, "unauthorized", exc.message, {"check": exc.check}) from None
        advanced = await self.db(
            self.store.advance_sign_count, credential.uuid, state.sign_count, verified.sign_count
        )
        if not advanced:
            raise ApiError(
                401,
                "unauthorized",
                "another assertion of this passkey was accepted meanwhile; sign again",
                {"check": "sign_count"},
            )

    # -------------------------------------------------------------------------- credentials

    async def _new_credential_challenge(
        self, org_id: str, principal: Principal, kind: str, *, via_code: bool, request: Request
    ) -> dict[str, Any]:
        if kind not in ("Key", "Fido2"):
            raise bad_request(
                f'credential kind {kind!r} is not served by the sandbox; use "Key" or "Fido2"'
            )
        self._prune()
        challenge = CredentialChallenge(
            identifier=new_id("cc", 16),
            challenge=random_token(32),
            org_id=org_id,
            principal_id=principal.id,
            kind=kind,
            via_code=via_code,
            expires=time.monotonic() + CHALLENGE_TTL,
        )
        self.credential_challenges[challenge.identifier] = challenge
        if kind == "Fido2":
            return await self._fido2_challenge(challenge, principal, request)
        return {
            "kind": kind,
            "challengeIdentifier": challenge.identifier,
            "challenge": challenge.challenge,
            "rp": RP,
            "user": {"id": principal.id, "name": principal.name, "displayName": principal.name},
            "supportedCredentialKinds": {"firstFactor": ["Key"], "secondFactor": []},
            "attestation": "direct",
            "pubKeyCredParams": [
                {"type": "public-key", "alg": -8},
                {"type": "public-key", "alg": -7},
            ],
            "excludeCredentials": [],
        }

    async def _fido2_challenge(
        self, challenge: CredentialChallenge, principal: Principal, request: Request
    ) -> dict[str, Any]:
        rp = self.rp_of(challenge.org_id)
        existing = await self.db(self.store.list_credentials, principal.id)
        return {
            "kind": "Fido2",
            "challengeIdentifier": challenge.identifier,
            "challenge": challenge.challenge,
            "rp": self.rp_entity(challenge.org_id, request),
            "user": {"id": principal.id, "name": principal.name, "displayName": principal.name},
            "supportedCredentialKinds": {"firstFactor": ["Fido2", "Key"], "secondFactor": []},
            "authenticatorSelection": {
                "residentKey": "required",
                "requireResidentKey": True,
                "userVerification": rp.user_verification,
            },
            "attestation": "direct",
            "pubKeyCredParams": [
                {"type": "public-key", "alg": -7},
                {"type": "public-key", "alg": -257},
                {"type": "public-key", "alg": -8},
            ],
            "excludeCredentials": [
                {"type": "public-key", "id": c.credential_id} for c in existing if c.kind == "Fido2"
            ],
        }

    async def credential_init(self, ctx: Ctx) -> tuple[int, Any]:
        kind = ctx.need("kind", str)
        return 200, await self._new_credential_challenge(
            ctx.who.org_id, ctx.who.principal, kind, via_code=False, request=ctx.request
        )

    async def _create_key_credential(
        self, ctx: Ctx, *, via_code: bool, caller_principal: str | None
    ) -> tuple[int, Any]:
        identifier = ctx.need("challengeIdentifier", str)
        challenge = self.credential_challenges.pop(identifier, None)
        if (
            challenge is None
            or challenge.expires < time.monotonic()
            or challenge.via_code != via_code
            or (caller_principal is not None and challenge.principal_id != caller_principal)
        ):
            raise bad_request(
                "unknown or already used challengeIdentifier; create a new credential challenge"
            )
        kind = ctx.field("credentialKind", str, required=False) or challenge.kind
        if kind != challenge.kind:
            raise bad_request(
                f"credentialKind {kind!r} differs from the challenge's kind {challenge.kind!r}"
            )
        if kind == "Fido2":
            return await self._create_fido2_credential(ctx, challenge)
        name = ctx.field("credentialName", str, required=False) or "Key credential"
        info = ctx.need("credentialInfo", dict)
        cred_id = info.get("credId")
        client_data = info.get("clientData")
        attestation = info.get("attestationData")
        if not all(isinstance(v, str) and v for v in (cred_id, client_data, attestation)):
            raise bad_request("credentialInfo needs credId, clientData and attestationData strings")
        assert isinstance(cred_id, str) and isinstance(client_data, str)
        assert isinstance(attestation, str)
        if not all(c in string.ascii_letters + string.digits + "-_" for c in cred_id):
            raise bad_request("credentialInfo.credId must be base64url (A-Z a-z 0-9 - _)")
        try:
            pem, public_key = verify_key_attestation(
                client_data_b64=client_data,
                attestation_b64=attestation,
                challenge=challenge.challenge,
            )
        except KeyError_ as exc:
            raise bad_request(f"invalid key attestation: {exc}", "invalid_attestation") from None
        credential = Credential(
            uuid=new_id("cr", 10),
            credential_id=cred_id,
            org_id=challenge.org_id,
            principal_id=challenge.principal_id,
            kind="Key",
            name=name,
            public_key=pem,
            algorithm=public_key.algorithm,
            is_active=True,
            date_created=utc_now_iso(),
            origin=ORIGIN,
            relying_party_id=RP["id"],
        )
        try:
            await self.db(self.store.insert_credential, credential)
        except Conflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        return 200, credential.to_api()

    async def _create_fido2_credential(
        self, ctx: Ctx, challenge: CredentialChallenge
    ) -> tuple[int, Any]:
        name = ctx.field("credentialName", str, required=False) or "Passkey"
        credential = await self._register_fido2(challenge, ctx.need("credentialInfo", dict), name)
        return 200, credential.to_api()

    async def _register_fido2(
        self, challenge: CredentialChallenge, info: dict[str, Any], name: str
    ) -> Credential:
        values = [info.get(f) for f in ("credId", "clientData", "attestationData")]
        if not all(isinstance(v, str) and v for v in values):
            raise bad_request("credentialInfo needs credId, clientData and attestationData strings")
        cred_id, client_data, attestation = (str(v) for v in values)
        if not all(c in string.ascii_letters + string.digits + "-_" for c in cred_id):
            raise bad_request("credentialInfo.credId must be base64url (A-Z a-z 0-9 - _)")
        rp = self.rp_of(challenge.org_id)
        try:
            registration = verify_registration(
                cred_id=cred_id,
                client_data_b64=client_data,
                attestation_b64=attestation,
                challenge=challenge.challenge,
                origins=rp.origins,
                rp_ids=rp.rp_ids,
                require_uv=rp.user_verification == "required",
            )
        except WebAuthnError as exc:
            raise ApiError(
                400,
                "invalid_attestation",
                f"invalid Fido2 attestation: {exc.message}",
                {"check": exc.check},
            ) from None
        credential = self._fido2_credential(
            challenge.org_id, challenge.principal_id, name, registration, utc_now_iso()
        )
        try:
            await self.db(
                self.store.insert_fido2_credential,
                credential,
                self._fido2_state(credential.uuid, registration),
            )
        except Conflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        return credential

    async def credential_create(self, ctx: Ctx) -> tuple[int, Any]:
        return await self._create_key_credential(
            ctx, via_code=False, caller_principal=ctx.who.principal.id
        )

    async def service_account_credential_create(self, ctx: Ctx) -> tuple[int, Any]:
        if ctx.who.principal.kind != "ServiceAccount":
            raise ApiError(
                403,
                "forbidden",
                "only service accounts may call /auth/service-accounts/credentials;"
                " use POST /auth/credentials for users and PATs",
            )
        pem = ctx.need("publicKey", str)
        name = ctx.field("name", str, required=False) or "Service account key"
        try:
            public_key = load_public_key(pem)
        except KeyError_ as exc:
            raise bad_request(str(exc)) from None
        credential = Credential(
            uuid=new_id("cr", 10),
            credential_id=random_token(24),
            org_id=ctx.who.org_id,
            principal_id=ctx.who.principal.id,
            kind="Key",
            name=name,
            public_key=pem,
            algorithm=public_key.algorithm,
            is_active=True,
            date_created=utc_now_iso(),
            origin=ORIGIN,
            relying_party_id=RP["id"],
        )
        await self.db(self.store.insert_credential, credential)
        return 200, credential.to_api()

    async def credential_list(self, ctx: Ctx) -> tuple[int, Any]:
        credentials = await self.db(self.store.list_credentials, ctx.who.principal.id)
        return 200, {"items": [c.to_api() for c in credentials]}

    async def _own_credential(self, ctx: Ctx, uuid: str) -> Credential:
        credential = await self.db(self.store.credential_by_uuid, uuid)
        if credential is None or credential.principal_id != ctx.who.principal.id:
            raise ApiError(
                404, "not_found", f"credential {uuid} not found; list credentials for valid uuids"
            )
        return credential

    async def credential_activate(self, ctx: Ctx) -> tuple[int, Any]:
        credential = await self._own_credential(ctx, ctx.need("credentialUuid", str))
        await self.db(self.store.set_active, credential.uuid, True)
        return 200, {"message": "success"}

    async def credential_deactivate(self, ctx: Ctx) -> tuple[int, Any]:
        credential = await self._own_credential(ctx, ctx.need("credentialUuid", str))
        await self.db(self.store.set_active, credential.uuid, False)
        return 200, {"message": "success"}

    async def credential_delete(self, ctx: Ctx) -> tuple[int, Any]:
        credential = await self._own_credential(ctx, ctx.params["credentialUuid"])
        await self.db(self.store.delete_credential, credential.uuid)
        return 200, {}

    async def code_create(self, ctx: Ctx) -> tuple[int, Any]:
        raw = ctx.body.get("expiration") if isinstance(ctx.body, dict) else None
        try:
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                # the SDKs also send epoch time: milliseconds (JavaScript's Date) or seconds
                expiration = datetime.fromtimestamp(raw / 1000 if raw > 1e11 else raw, UTC)
            elif isinstance(raw, str):
                expiration = datetime.fromisoformat(raw)
            else:
                raise bad_request("missing required field 'expiration' in the request body")
        except (ValueError, OverflowError, OSError):
            raise bad_request("expiration must be an ISO 8601 date-time or epoch time") from None
        if expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=UTC)
        now = datetime.now(UTC)
        if expiration <= now or expiration > now + timedelta(seconds=CODE_MAX_TTL + 1):
            raise bad_request("expiration must be in the future and at most 1 minute ahead")
        alphabet = string.ascii_uppercase + string.digits
        code = "-".join("".join(secrets.choice(alphabet) for _ in range(3)) for _ in range(3))
        stamp = expiration.astimezone(UTC).isoformat().replace("+00:00", "Z")
        # --time-scale shortens the code's real lifetime (the response keeps the asked one).
        lifetime = (expiration - now) / self.settings.time_scale
        effective = (now + lifetime).astimezone(UTC).isoformat()
        await self.db(self.store.insert_code, code, ctx.who.org_id, ctx.who.principal.id, effective)
        return 200, {"code": code, "expiration": stamp}

    async def code_init(self, ctx: Ctx) -> tuple[int, Any]:
        code = ctx.need("code", str)
        kind = ctx.need("credentialKind", str)
        found = await self.db(self.store.consume_code, code)
        invalid = ApiError(401, "unauthorized", "invalid, used or expired code; create a new one")
        if found is None:
            raise invalid
        org_id, principal_id, expiration = found
        expires = datetime.fromisoformat(expiration.replace("Z", "+00:00"))
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        if expires < datetime.now(UTC):
            raise invalid
        principal = self.principals[principal_id]
        return 200, await self._new_credential_challenge(
            org_id, principal, kind, via_code=True, request=ctx.request
        )

    async def code_verify(self, ctx: Ctx) -> tuple[int, Any]:
        return await self._create_key_credential(ctx, via_code=True, caller_principal=None)

    # ------------------------------------------------------------------------- delegated auth

    async def delegated_registration(self, ctx: Ctx) -> tuple[int, Any]:
        """Service accounts only: create an end user and the challenge their first passkey
        signs; `temporaryAuthenticationToken` is the bearer of POST /auth/registration."""
        if ctx.who.principal.kind != "ServiceAccount":
            raise ApiError(
                403, "forbidden", "only a service account may call /auth/registration/delegated"
            )
        email = ctx.need("email", str).strip()
        kind = ctx.field("kind", str, required=False) or "EndUser"
        if kind not in ("EndUser", "CustomerEmployee") or not email:
            raise bad_request('send {email, kind: "EndUser" or "CustomerEmployee"}')
        if any(p.org_id == ctx.who.org_id and p.name == email for p in self.principals.values()):
            raise ApiError(409, "conflict", "a user with this username already exists")
        principal = Principal(new_id("us", 8), ctx.who.org_id, kind, email)
        await self.db(self.store.insert_principal, principal)
        self.principals[principal.id] = principal
        body = await self._new_credential_challenge(
            principal.org_id, principal, "Fido2", via_code=False, request=ctx.request
        )
        temporary = make_jwt(
            {"registration": body["challengeIdentifier"], "sub": principal.id}, self.jwt_secret
        )
        body = {k: v for k, v in body.items() if k not in ("kind", "challengeIdentifier")}
        return 200, {**body, "temporaryAuthenticationToken": temporary}

    async def register(self, ctx: Ctx) -> tuple[int, Any]:
        """Complete registration: the new user's first passkey, with the temporary token."""
        scheme, _, bearer = ctx.request.headers.get("authorization", "").partition(" ")
        claims = read_jwt(bearer.strip(), self.jwt_secret) if scheme.lower() == "bearer" else None
        identifier = claims.get("registration") if claims else None
        challenge = self.credential_challenges.pop(str(identifier), None) if identifier else None
        if challenge is None or challenge.expires < time.monotonic():
            raise ApiError(
                401,
                "unauthorized",
                "send the temporaryAuthenticationToken of a live registration as the bearer",
            )
        first = ctx.need("firstFactorCredential", dict)
        if first.get("credentialKind") != "Fido2" or not isinstance(
            first.get("credentialInfo"), dict
        ):
            raise bad_request(
                'firstFactorCredential needs credentialKind "Fido2" and a credentialInfo object'
            )
        name = str(first.get("credentialName") or "Passkey")
        credential = await self._register_fido2(challenge, first["credentialInfo"], name)
        principal = self.principals[challenge.principal_id]
        return 200, {
            "credential": {"uuid": credential.uuid, "kind": "Fido2", "name": credential.name},
            "user": {"id": principal.id, "username": principal.name, "orgId": principal.org_id},
        }

    async def delegated_login(self, ctx: Ctx) -> tuple[int, Any]:
        """Service accounts only: a token for an end user, without the user's credentials.
        The token reads as the user; writes still need the user's own signature."""
        if ctx.who.principal.kind != "ServiceAccount":
            raise ApiError(
                403, "forbidden", "only a service account may call /auth/login/delegated"
            )
        username = ctx.need("username", str)
        user = next(
            (
                p
                for p in self.principals.values()
                if p.org_id == ctx.who.org_id and p.name == username and p.kind != "ServiceAccount"
            ),
            None,
        )
        if user is None:
            raise ApiError(404, "not_found", "no user with this username in the organisation")
        token = TokenRecord(new_id("to", 8), user.org_id, "Delegated", user.id, user.name)
        await self.db(self.store.insert_token, token)
        self.tokens[token.id] = token
        return 200, {"token": make_jwt(self._claims(token), self.jwt_secret)}

    # ------------------------------------------------------------------------------ webhooks

    def _own_webhook(self, ctx: Ctx) -> Webhook:
        webhook_id = ctx.params["webhookId"]
        webhook = self.deliveries.webhooks.get(webhook_id)
        if webhook is None or webhook.org_id != ctx.who.org_id:
            raise ApiError(404, "not_found", f"webhook {webhook_id} not found")
        return webhook

    @staticmethod
    def _webhook_fields(ctx: Ctx, *, creating: bool) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        url = ctx.field("url", str, required=creating)
        if url is not None:
            if not url.startswith(("http://", "https://")):
                raise bad_request("url must be an http:// or https:// URL")
            fields["url"] = url
        events = ctx.field("events", list, required=creating)
        if events is not None:
            if not events or not all(isinstance(e, str) and e for e in events):
                raise bad_request('events must be a non-empty list of event kinds, or ["*"]')
            fields["events"] = events
        if isinstance(ctx.body, dict) and "description" in ctx.body:
            description = ctx.body["description"]
            if description is not None and not isinstance(description, str):
                raise bad_request("description must be a string")
            fields["description"] = description
        status = ctx.field("status", str, required=False)
        if status is not None:
            if status not in ("Enabled", "Disabled"):
                raise bad_request('status must be "Enabled" or "Disabled"')
            fields["status"] = status
        return fields

    async def webhook_create(self, ctx: Ctx) -> tuple[int, Any]:
        fields = self._webhook_fields(ctx, creating=True)
        now = utc_now_iso()
        webhook = Webhook(
            id=new_id("wh", 10),
            org_id=ctx.who.org_id,
            url=fields["url"],
            events=fields["events"],
            description=fields.get("description"),
            status=fields.get("status", "Enabled"),
            secret="whs-" + secrets.token_hex(20),
            date_created=now,
            date_updated=now,
        )
        if not await self.db(self.store.insert_webhook, webhook, WEBHOOK_LIMIT):
            raise bad_request(
                f"the organisation already has the maximum of {WEBHOOK_LIMIT} webhooks;"
                " delete one before creating another",
                "webhook_limit",
            )
        self.deliveries.webhooks[webhook.id] = webhook
        return 200, {**webhook.to_api(), "secret": webhook.secret}

    async def webhook_list(self, ctx: Ctx) -> tuple[int, Any]:
        mine = [w for w in self.deliveries.webhooks.values() if w.org_id == ctx.who.org_id]
        limit, start = _page_args(ctx.request)
        page = mine[start : start + limit]
        result: dict[str, Any] = {"items": [w.to_api() for w in page]}
        if start + limit < len(mine):
            result["nextPageToken"] = str(start + limit)
        return 200, result

    async def webhook_get(self, ctx: Ctx) -> tuple[int, Any]:
        return 200, self._own_webhook(ctx).to_api()

    async def webhook_update(self, ctx: Ctx) -> tuple[int, Any]:
        webhook = self._own_webhook(ctx)
        fields = self._webhook_fields(ctx, creating=False)
        updated = Webhook(
            id=webhook.id,
            org_id=webhook.org_id,
            url=fields.get("url", webhook.url),
            events=fields.get("events", webhook.events),
            description=fields.get("description", webhook.description),
            status=fields.get("status", webhook.status),
            secret=webhook.secret,
            date_created=webhook.date_created,
            date_updated=utc_now_iso(),
        )
        await self.db(self.store.update_webhook, updated)
        self.deliveries.webhooks[webhook.id] = updated
        return 200, updated.to_api()

    async def webhook_delete(self, ctx: Ctx) -> tuple[int, Any]:
        webhook = self._own_webhook(ctx)
        await self.db(self.store.delete_webhook, webhook.id)
        self.deliveries.webhooks.pop(webhook.id, None)
        return 200, {"deleted": True}

    async def webhook_ping(self, ctx: Ctx) -> tuple[int, Any]:
        webhook = self._own_webhook(ctx)
        status, error = await self.deliveries.ping(webhook)
        result: dict[str, Any] = {"status": status}
        if error is not None:
            result["error"] = error
        return 200, result

    async def webhook_events(self, ctx: Ctx) -> tuple[int, Any]:
        webhook = self._own_webhook(ctx)
        await self.deliveries.flush()
        limit, after = _page_args(ctx.request)
        kind = ctx.request.query_params.get("kind")
        failed_param = ctx.request.query_params.get("deliveryFailed")
        failed = None if failed_param is None else failed_param.lower() == "true"
        rows = await self.db(
            functools.partial(
                self.store.list_deliveries,
                webhook.id,
                limit=limit + 1,
                after_seq=after,
                kind=kind,
                failed=failed,
            )
        )
        result: dict[str, Any] = {"items": [r.to_api() for _, r in rows[:limit]]}
        if len(rows) > limit:
            result["nextPageToken"] = str(rows[limit - 1][0])
        return 200, result

    async def webhook_event(self, ctx: Ctx) -> tuple[int, Any]:
        webhook = self._own_webhook(ctx)
        await self.deliveries.flush()
        event_id = ctx.params["eventId"]
        record = await self.db(self.store.get_delivery, webhook.id, event_id)
        if record is None:
            raise ApiError(404, "not_found", f"webhook event {event_id} not found")
        return 200, record.to_api()

    # ------------------------------------------------------------------------------ control

    async def control_state(self, request: Request) -> Response:
        with_events = request.query_params.get("events") in ("1", "true", "yes")
        counts = await self.db(self.store.credential_counts)
        return JSONResponse(
            {
                "requests": self.counters.snapshot(),
                "faults": vars(self.faults.counters).copy(),
                "deliveries": self.deliveries.snapshot(with_events=with_events),
                "events_emitted": self.deliveries.events_emitted,
                "events_dropped": self.deliveries.events_dropped,
                "retries_scheduled": self.deliveries.retries_scheduled,
                "credentials": counts,
                "principals": {
                    p.id: {"kind": p.kind, "name": p.name} for p in self.principals.values()
                },
                "webhooks": len(self.deliveries.webhooks),
                "org_id": self.org_id,
                "pid": os.getpid(),
            }
        )

    async def control_requests(self, request: Request) -> Response:
        """The request log in arrival order, after sequence number `since` (default 0)."""
        try:
            after = int(request.query_params.get("since", "0"))
        except ValueError:
            return error_response(400, "bad_request", "since must be an integer sequence number")
        return JSONResponse({"seq": self.counters.seq, "requests": self.counters.since(after)})

    async def control_relying_parties(self, request: Request) -> Response:
        """GET or PUT {"origins": [...], "rpIds": [...], "userVerification"?}: the allowed
        WebAuthn origins and rpIds of an organisation (?orgId=, default the sandbox's)."""
        org_id = request.query_params.get("orgId", self.org_id)
        if org_id not in self.relying_parties:
            return error_response(404, "not_found", f"organisation {org_id} not found")
        current = self.relying_parties[org_id]
        if request.method == "PUT":
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                return error_response(400, "bad_request", "the body must be JSON")
            if not isinstance(body, dict):
                return error_response(400, "bad_request", "the body must be a JSON object")
            origins = body.get("origins", current.origins)
            rp_ids = body.get("rpIds", current.rp_ids)
            uv = body.get("userVerification", current.user_verification)
            if not all(
                isinstance(v, list) and all(isinstance(i, str) for i in v)
                for v in (origins, rp_ids)
            ):
                return error_response(
                    400, "bad_request", "origins and rpIds must be lists of strings"
                )
            if uv not in ("required", "preferred"):
                return error_response(
                    400, "bad_request", 'userVerification must be "required" or "preferred"'
                )
            try:
                clean_origins, clean_rp_ids = validate_relying_parties(origins, rp_ids)
            except WebAuthnError as exc:
                return error_response(400, "bad_request", exc.message, {"check": exc.check})
            current = RelyingParties(org_id, clean_origins, clean_rp_ids, uv)
            await self.db(self.store.put_relying_parties, current)
            self.relying_parties[org_id] = current
        return JSONResponse(current.to_api())

    async def control_faults(self, request: Request) -> Response:
        if request.method == "PUT":
            try:
                changes = json.loads(await request.body() or b"{}")
                if not isinstance(changes, dict):
                    raise FaultConfigError("the body must be a JSON object of fault fields")
                self.faults.config = self.faults.config.updated(changes)
            except (ValueError, TypeError) as exc:
                return error_response(400, "bad_request", str(exc).splitlines()[0])
        return JSONResponse(self.faults.config.to_json())

    async def control_event_rate(self, request: Request) -> Response:
        """GET or PUT {"rate": N}: synthetic events per second to every enabled webhook."""
        if request.method == "PUT":
            try:
                body = json.loads(await request.body() or b"{}")
                rate = float(body["rate"])
                if rate < 0 or rate > 100_000:
                    raise ValueError
            except (ValueError, TypeError, KeyError):
                return error_response(
                    400, "bad_request", 'send {"rate": N} with 0 <= N <= 100000 events per second'
                )
            self.deliveries.set_event_rate(rate)
        return JSONResponse({"rate": self.deliveries.event_rate})

    async def control_events(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return error_response(400, "bad_request", "the body must be JSON")
        if not isinstance(body, dict):
            return error_response(400, "bad_request", "the body must be a JSON object")
        kind = body.get("kind", "wallet.created")
        data = body.get("data", {})
        count = int(body.get("count", 1))
        if not isinstance(kind, str) or not isinstance(data, dict) or count < 1:
            return error_response(
                400, "bad_request", "send {kind: str, data: object, count: positive int}"
            )
        queued = sum(self.deliveries.emit(kind, data) for _ in range(count))
        return JSONResponse({"queued": queued})

    # ------------------------------------------------------------------------------- routes

    def route_specs(self) -> list[RouteSpec]:
        read = RouteSpec
        signed = functools.partial(RouteSpec, signed=True, mutating=True)
        cred_uuid = "{credentialUuid}"
        return [
            read("POST", "/auth/action/init", self.action_init),
            read("POST", "/auth/action", self.action_sign),
            signed("POST", "/auth/login/delegated", self.delegated_login),
            signed("POST", "/auth/registration/delegated", self.delegated_registration),
            read("POST", "/auth/registration", self.register, auth=False, mutating=True),
            read("POST", "/auth/credentials/init", self.credential_init),
            read("POST", "/auth/credentials/code/init", self.code_init, auth=False),
            read(
                "POST", "/auth/credentials/code/verify", self.code_verify, auth=False, mutating=True
            ),
            signed("POST", "/auth/credentials/code", self.code_create),
            signed("PUT", "/auth/credentials/activate", self.credential_activate),
            signed("PUT", "/auth/credentials/deactivate", self.credential_deactivate),
            read("GET", "/auth/credentials", self.credential_list),
            signed("POST", "/auth/credentials", self.credential_create),
            signed("DELETE", f"/auth/credentials/{cred_uuid}", self.credential_delete),
            signed(
                "POST", "/auth/service-accounts/credentials", self.service_account_credential_create
            ),
            signed(
                "DELETE", f"/auth/service-accounts/credentials/{cred_uuid}", self.credential_delete
            ),
            signed("POST", "/webhooks", self.webhook_create),
            read("GET", "/webhooks", self.webhook_list),
            read("GET", "/webhooks/{webhookId}", self.webhook_get),
            signed("PUT", "/webhooks/{webhookId}", self.webhook_update),
            signed("DELETE", "/webhooks/{webhookId}", self.webhook_delete),
            signed("POST", "/webhooks/{webhookId}/ping", self.webhook_ping),
            read("GET", "/webhooks/{webhookId}/events", self.webhook_events),
            read("GET", "/webhooks/{webhookId}/events/{eventId}", self.webhook_event),
        ]


def _page_args(request: Request) -> tuple[int, int]:
    try:
        limit = int(request.query_params.get("limit", "100"))
        start = int(request.query_params.get("paginationToken", "0"))
    except ValueError:
        raise bad_request("limit and paginationToken must be whole numbers") from None
    if not 1 <= limit <= 1000 or start < 0:
        raise bad_request("limit must be between 1 and 1000")
    return limit, start


# ------------------------------------------------------------------------------ the ASGI app


class DropConnection:
    """Outermost ASGI layer: lets a handler close the client's connection with no response.

    It exposes a coroutine in the scope; the handler calls it, every later `send` is swallowed,
    and the TCP connection is closed under uvicorn (the client sees a connection error).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        dropped = False

        async def drop() -> None:
            nonlocal dropped
            dropped = True
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None:
                transport.close()
                await asyncio.sleep(0)  # let the server notice the closed connection
            else:  # not under uvicorn's h11 cycle: start a response and abandon it
                await send({"type": "http.response.start", "status": 500, "headers": []})

        async def guarded_send(message: Message) -> None:
            if not dropped:
                await send(message)

        scope[DROP_SCOPE_KEY] = drop
        await self.app(scope, receive, guarded_send)


def build_app(sandbox: Sandbox) -> ASGIApp:
    routes: list[Route] = []
    for spec in sandbox.route_specs():

        async def endpoint(request: Request, spec: RouteSpec = spec) -> Response:
            return await sandbox.handle(spec, request)

        routes.append(Route(spec.template, endpoint, methods=[spec.method]))
    routes.append(Route("/_sandbox/state", sandbox.control_state, methods=["GET"]))
    routes.append(Route("/_sandbox/faults", sandbox.control_faults, methods=["GET", "PUT"]))
    routes.append(Route("/_sandbox/requests", sandbox.control_requests, methods=["GET"]))
    routes.append(Route("/_sandbox/events", sandbox.control_events, methods=["POST"]))
    routes.append(
        Route("/_sandbox/relying-parties", sandbox.control_relying_parties, methods=["GET", "PUT"])
    )
    routes.append(
        Route("/_sandbox/events/rate", sandbox.control_event_rate, methods=["GET", "PUT"])
    )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        key = f"{request.method} (no route)"
        if exc.status_code == 404:
            response = error_response(
                404, "not_found", f"no such route: {request.method} {request.url.path}"
            )
        elif exc.status_code == 405:
            response = error_response(
                405,
                "method_not_allowed",
                f"method {request.method} is not allowed on {request.url.path}",
            )
        else:
            response = error_response(exc.status_code, "http_error", str(exc.detail))
        sandbox.counters.count(key, response.status_code)
        return response

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(
            500, "internal_error", f"the sandbox failed: {type(exc).__name__}; see its log"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await sandbox.deliveries.start(event_rate=sandbox.settings.event_rate)
        try:
            yield
        finally:
            await sandbox.deliveries.stop()

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    return DropConnection(app)

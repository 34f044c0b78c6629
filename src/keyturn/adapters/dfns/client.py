"""An async httpx client for the Dfns API, with user-action signing.

Every state-changing call is signed: the body is serialized once (compact JSON), that exact
string is the `userActionPayload` of `POST /auth/action/init`, the challenge is signed by the
client's :class:`KeySigner`, and the very same bytes are sent with the `X-DFNS-USERACTION` token.
The client does not retry; errors say whether retrying is safe (see :mod:`.errors`).

Nothing here logs or puts into an error the bearer token, a user-action token, a webhook secret,
a credential code or key material; request bodies and response bodies are never logged.

End users' passkeys: a service account logs a user in with :meth:`DfnsClient.delegated_login`;
:meth:`DfnsClient.as_user` gives a client that reads as that user and has each of its writes
signed by the user's passkey through an :data:`AssertionRelay` (the challenge goes to the user's
browser or device, the Fido2 assertion comes back), since a delegated token alone cannot write.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from keyturn.adapters.dfns.errors import (
    CredentialNotAllowed,
    DfnsApiError,
    DfnsBadResponse,
    DfnsConnectionError,
    DfnsRateLimited,
    DfnsTimeout,
    InvalidRequest,
    MissingSigner,
    PolicyPending,
    clean_server_text,
)
from keyturn.adapters.dfns.models import (
    Credential,
    CredentialChallenge,
    CredentialCode,
    DelegatedToken,
    MissingField,
    PingResult,
    UserActionChallenge,
    Webhook,
    WebhookEvent,
    WebhookEventPage,
    WebhookSecret,
)
from keyturn.adapters.dfns.signing import KeySigner, compact_json
from keyturn.domain.errors import ConfigError, ProviderError
from keyturn.ports import RequestBudget, RequestObserver

log = logging.getLogger("keyturn.dfns")

T = TypeVar("T")

#: Signs a user action elsewhere (the user's browser or device): given the challenge, returns
#: `/auth/action`'s firstFactor, e.g. {"kind": "Fido2", "credentialAssertion": {...}}.
AssertionRelay = Callable[[UserActionChallenge], Awaitable[Mapping[str, Any]]]

_MAX_PAGES = 1000
_TIMEOUT_PHASES: tuple[tuple[type[httpx.TimeoutException], str], ...] = (
    (httpx.ConnectTimeout, "connect"),
    (httpx.ReadTimeout, "read"),
    (httpx.WriteTimeout, "write"),
    (httpx.PoolTimeout, "pool"),
)


def _check_base_url(base_url: str) -> str:
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError):
        raise ConfigError(
            f"Dfns base URL {base_url!r} is not a URL; use scheme://host[:port], "
            "e.g. https://api.dfns.io"
        ) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            f"Dfns base URL {base_url!r} must be http(s)://host[:port], e.g. https://api.dfns.io"
        )
    if url.query or url.fragment or url.path not in ("", "/"):
        raise ConfigError(
            f"Dfns base URL {base_url!r} must be bare scheme://host[:port] without a path, "
            "query or fragment (signed paths are the request's pathname)"
        )
    return base_url.rstrip("/")


def _check_token(token: str) -> None:
    # Checked here because httpx would otherwise put the header value in its error message.
    if (
        not isinstance(token, str)
        or not token
        or any(c.isspace() or not c.isprintable() for c in token)
        or not token.isascii()
    ):
        raise ConfigError(
            "the Dfns access token is empty or contains spaces, newlines or non-ASCII "
            "characters; check where it is configured (the value is not shown)"
        )


def _segment(value: str, what: str) -> str:
    """One URL path segment: non-empty, percent-encoded."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"the {what} is empty; pass the id the API returned")
    return quote(value, safe="-_.~")


def _iso_utc(moment: datetime) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidRequest(
            "the expiration must be a timezone-aware datetime (e.g. datetime.now(UTC) + ...)"
        )
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=512)
def _absolute(base_url: str, path: str) -> httpx.URL:
    """`base_url` + `path` as httpx's URL, parsed once per path: given a path, httpx parses it
    and joins it to the base URL on every request (~3% of a worker's CPU)."""
    return httpx.URL(base_url + path)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The default verifying TLS context (certifi's roots, as httpx builds it), made once."""
    return httpx.create_ssl_context()


class DfnsClient:
    """Async client for the Dfns API. Use as an async context manager, or call :meth:`aclose`.

    `token` is the service-account or PAT access token (the Authorization bearer); `signer`
    signs user actions. `transport` is injected for tests (``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        signer: KeySigner | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        safe_retries: int = 3,
        fence: Callable[[], None] | None = None,
        budget: RequestBudget | None = None,
        observe: RequestObserver | None = None,
    ) -> None:
        self._base_url = _check_base_url(base_url)
        #: Side-effect-free calls (reads, challenges, user-action signing) are retried this many
        #: times on a retryable error before the error reaches the caller; state-changing calls
        #: never are (the engine reconciles those).
        self._safe_retries = max(0, int(safe_retries))
        #: Called before every request; it raises to stop a caller that may no longer act
        #: (a worker whose lease ran out). Its exception propagates unchanged.
        self._fence = fence
        #: The provider's request budget, shared with the other clients of this process or of
        #: every process on the database (see keyturn.ports.RequestBudget), if any.
        self._budget = budget
        #: Told of every request sent (method, status or failure): the process's metrics.
        self._observe = observe
        _check_token(token)
        if not timeout or timeout <= 0:
            raise ConfigError(f"the Dfns client timeout must be positive seconds, got {timeout}")
        self._token = token
        self._signer = signer
        self._relay: AssertionRelay | None = None
        self._presented: str | None = None
        self._timeout = float(timeout)
        self._http = httpx.AsyncClient(
            base_url=self._base_url,
            transport=transport,
            # one TLS context per process: building one costs ~20 ms of CPU per client, and a
            # worker opens a client per step
            verify=_tls_context(),
            timeout=httpx.Timeout(
                connect=self._timeout,
                read=self._timeout,
                write=self._timeout,
                pool=self._timeout,
            ),
            follow_redirects=False,
            headers={"Accept": "application/json", "User-Agent": "keyturn"},
        )
        self._owns_http = True

    # -------------------------------------------------------------------------- life cycle

    def with_signer(self, signer: KeySigner) -> DfnsClient:
        """A client with the same base URL, token, timeout and connection pool, signing with
        `signer`. It borrows this client's connections: close this one, not the derived one
        (closing the derived client is a no-op)."""
        return self._derive(signer)

    def _derive(self, signer: KeySigner | None) -> DfnsClient:
        derived = object.__new__(DfnsClient)
        derived._base_url = self._base_url
        derived._token = self._token
        derived._signer = signer
        derived._relay = None
        derived._presented = None
        derived._timeout = self._timeout
        derived._safe_retries = self._safe_retries
        derived._fence = self._fence
        derived._budget = self._budget
        derived._observe = self._observe
        derived._http = self._http
        derived._owns_http = False
        return derived

    def as_user(
        self, token: DelegatedToken | str, relay: AssertionRelay | None = None
    ) -> DfnsClient:
        """A client acting as an end user (`token` from :meth:`delegated_login`), with this
        client's base URL, timeout and connection pool. It reads as the user; its signed calls
        are signed through `relay` (the user's passkey, elsewhere), never by this client's
        signer. Close this client, not the derived one."""
        value = token.reveal() if isinstance(token, DelegatedToken) else token
        _check_token(value)
        derived = self._derive(None)
        derived._token = value
        derived._relay = relay
        return derived

    def presenting(self, user_action: str) -> DfnsClient:
        """A client acting as this one's caller (same token, connections and relay) whose next
        signed call presents `user_action` instead of signing: a token from
        :meth:`complete_user_action` for exactly that call (method, path and body), e.g. an
        assertion the user's browser made. Single use; close this client, not the derived one."""
        if not user_action or not user_action.isascii() or not user_action.isprintable():
            raise InvalidRequest("the user-action token to present is empty or not ASCII text")
        derived = self._derive(self._signer)
        derived._token = self._token
        derived._relay = self._relay
        derived._presented = user_action
        return derived

    @property
    def signer(self) -> KeySigner | None:
        return self._signer

    @property
    def base_url(self) -> str:
        return self._base_url

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> DfnsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"DfnsClient(base_url={self._base_url!r}, signer={self._signer!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a DfnsClient holds an access token and cannot be pickled")

    # ------------------------------------------------------------------------------- core

    async def _send(
        self,
        method: str,
        path: str,
        *,
        content: bytes,
        headers: dict[str, str],
        params: Mapping[str, str] | None,
        mutating: bool,
    ) -> httpx.Response:
        if self._budget is not None:
            await self._budget.acquire()
        if self._fence is not None:
            self._fence()
        started = time.monotonic()
        try:
            response = await self._http.request(
                method,
                _absolute(self._base_url, path),
                content=content or None,
                headers=headers,
                params=params,
            )
        except httpx.TimeoutException as exc:
            phase = next((p for cls, p in _TIMEOUT_PHASES if isinstance(exc, cls)), "read")
            if self._observe is not None:
                self._observe(method, "timeout")
            log.debug("dfns %s %s timed out (%s)", method, path, phase)
            raise DfnsTimeout(
                method=method, path=path, phase=phase, seconds=self._timeout, mutating=mutating
            ) from None
        except httpx.TransportError as exc:
            sent = not isinstance(exc, httpx.ConnectError | httpx.UnsupportedProtocol)
            if self._observe is not None:
                self._observe(method, "connection")
            reason = clean_server_text(str(exc) or type(exc).__name__, [self._token])
            log.debug("dfns %s %s connection failed (%s)", method, path, type(exc).__name__)
            raise DfnsConnectionError(
                method=method,
                path=path,
                reason=reason,
                sent=sent,
                mutating=mutating,
                base_url=self._base_url,
            ) from None
        if self._observe is not None:
            self._observe(method, response.status_code)
        if self._budget is not None:
            if response.status_code == 429:
                self._budget.rate_limited_now()
            else:
                self._budget.succeeded()
        log.debug(
            "dfns %s %s -> %s in %.0f ms",
            method,
            path,
            response.status_code,
            (time.monotonic() - started) * 1000,
        )
        return response

    def _decode(self, response: httpx.Response, method: str, path: str, mutating: bool) -> Any:
        status = response.status_code
        body: Any = None
        parse_failed = False
        if response.content:
            try:
                body = response.json()
            except ValueError:
                parse_failed = True
        if status == 202:
            raise PolicyPending(
                method=method,
                path=path,
                approval=body if isinstance(body, Mapping) else {},
                mutating=mutating,
            )
        if 200 <= status < 300:
            if parse_failed:
                raise DfnsBadResponse(
                    method=method, path=path, status=status, problem="not JSON", mutating=mutating
                )
            return {} if body is None else body
        error = body.get("error") if isinstance(body, Mapping) else None
        if not isinstance(error, Mapping):
            error = body if isinstance(body, Mapping) else {}
        secrets = [self._token]
        message = clean_server_text(error.get("message") or response.reason_phrase, secrets)
        code_raw = error.get("code")
        code = clean_server_text(code_raw, secrets) if code_raw else None
        id_raw = error.get("id")
        error_id = clean_server_text(id_raw, secrets) if id_raw else None
        if status == 429:
            raise DfnsRateLimited(
                code, message, error_id, method=method, path=path, mutating=mutating
            )
        raise DfnsApiError(
            status, code, message, error_id, method=method, path=path, mutating=mutating
        )

    async def _safely(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run a side-effect-free exchange, retrying retryable failures with a short jittered
        backoff (0.05 s, 0.1 s, 0.2 s, ...)."""
        for n in range(self._safe_retries + 1):
            try:
                return await attempt()
            except ProviderError as exc:
                if not exc.retryable or n >= self._safe_retries:
                    raise
                await asyncio.sleep(0.05 * 2**n * (0.5 + random.random()))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        signed: bool = False,
        mutating: bool | None = None,
        authenticated: bool = True,
        params: Mapping[str, str] | None = None,
        retry: bool | None = None,
        origin: str | None = None,
    ) -> Any:
        """Send one request; sign it first when `signed`. Returns the parsed JSON body.

        Requests without side effects are retried on retryable errors (unless `retry=False`)."""
        is_mutating = signed if mutating is None else mutating
        if retry is None:
            retry = not is_mutating and not signed
        if retry:
            return await self._safely(
                lambda: self._call(
                    method,
                    path,
                    body=body,
                    signed=signed,
                    mutating=mutating,
                    authenticated=authenticated,
                    params=params,
                    retry=False,
                    origin=origin,
                )
            )
        content = b"" if body is None else compact_json(body)
        headers: dict[str, str] = {}
        if authenticated:
            headers["Authorization"] = f"Bearer {self._token}"
        if content:
            headers["Content-Type"] = "application/json"
        if origin is not None:
            headers["Origin"] = origin
        if signed:
            headers["X-DFNS-USERACTION"] = await self.sign_user_action(method, path, content)
        response = await self._send(
            method, path, content=content, headers=headers, params=params, mutating=is_mutating
        )
        return self._decode(response, method, path, is_mutating)

    def _parse(
        self,
        factory: Callable[[Mapping[str, Any]], T],
        data: Any,
        method: str,
        path: str,
        *,
        mutating: bool,
    ) -> T:
        if not isinstance(data, Mapping):
            raise DfnsBadResponse(
                method=method,
                path=path,
                status=200,
                problem="expected a JSON object",
                mutating=mutating,
            )
        try:
            return factory(data)
        except MissingField as exc:
            raise DfnsBadResponse(
                method=method, path=path, status=200, problem=str(exc), mutating=mutating
            ) from None

    def _items(self, data: Any, method: str, path: str) -> list[Mapping[str, Any]]:
        items = data.get("items") if isinstance(data, Mapping) else None
        if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
            raise DfnsBadResponse(
                method=method,
                path=path,
                status=200,
                problem="no 'items' list of objects",
                mutating=False,
            )
        return items

    # ---------------------------------------------------------------------- user actions

    async def sign_user_action(self, method: str, path: str, body: bytes | str = b"") -> str:
        """Get a user-action token for `method path` with exactly `body` (the bytes that will be
        sent; empty for no body): init, sign the challenge, `POST /auth/action`. The exchange
        has no effect until the token is used, so it is retried as a whole on retryable errors.
        A client from :meth:`as_user` has the challenge signed through its relay, once (a
        person may be asked): a failure reaches the caller."""
        if self._presented is not None:
            token, self._presented = self._presented, None
            return token
        if self._signer is None and self._relay is not None:
            return await self.relay_user_action(method, path, body, self._relay)
        return await self._safely(lambda: self._sign_user_action_once(method, path, body))

    async def user_action_challenge(
        self, method: str, path: str, body: bytes | str = b""
    ) -> UserActionChallenge:
        """`POST /auth/action/init` for `method path` with exactly `body`: the challenge to be
        signed, here or by the user's device (see :meth:`complete_user_action`)."""
        init = await self._safely(lambda: self._init_user_action(method, path, body))
        return self._parse(
            UserActionChallenge.from_api, init, "POST", "/auth/action/init", mutating=False
        )

    async def complete_user_action(
        self, challenge: UserActionChallenge, first_factor: Mapping[str, Any]
    ) -> str:
        """`POST /auth/action` with a firstFactor made elsewhere (e.g. a passkey's Fido2
        assertion from the user's browser); the user-action token."""
        result = await self._call(
            "POST",
            "/auth/action",
            body={
                "challengeIdentifier": challenge.challenge_identifier,
                "firstFactor": dict(first_factor),
            },
            mutating=False,
            retry=False,
        )
        token = result.get("userAction") if isinstance(result, Mapping) else None
        if not isinstance(token, str) or not token:
            raise DfnsBadResponse(
                method="POST",
                path="/auth/action",
                status=200,
                problem="no userAction token",
                mutating=False,
            )
        return token

    async def relay_user_action(
        self, method: str, path: str, body: bytes | str, relay: AssertionRelay
    ) -> str:
        """A user-action token for `method path body` whose assertion `relay` obtains from
        elsewhere (the user's browser): init, relay, `POST /auth/action`."""
        challenge = await self.user_action_challenge(method, path, body)
        first_factor = await relay(challenge)
        if not isinstance(first_factor, Mapping) or not first_factor.get("kind"):
            raise InvalidRequest(
                "the assertion relay must return a firstFactor object with a kind,"
                ' e.g. {"kind": "Fido2", "credentialAssertion": {...}}'
            )
        return await self.complete_user_action(challenge, first_factor)

    async def _init_user_action(self, method: str, path: str, body: bytes | str) -> Any:
        if not path.startswith("/") or "?" in path or "#" in path:
            raise InvalidRequest(
                f"user-action path {path!r} must be a pathname starting with / and no query"
            )
        try:
            payload = body.decode("utf-8") if isinstance(body, bytes) else body
        except UnicodeDecodeError:
            raise InvalidRequest(
                f"the body of {method} {path} is not UTF-8 text; user actions sign JSON bodies"
            ) from None
        return await self._call(
            "POST",
            "/auth/action/init",
            body={
                "userActionPayload": payload,
                "userActionHttpMethod": method.upper(),
                "userActionHttpPath": path,
                "userActionServerKind": "Api",
            },
            mutating=False,
            retry=False,
        )

    async def _sign_user_action_once(self, method: str, path: str, body: bytes | str) -> str:
        signer = self._signer
        if signer is None:
            raise MissingSigner(method=method, path=path)
        init = await self._init_user_action(method, path, body)
        if not isinstance(init, Mapping) or not init.get("challenge"):
            raise DfnsBadResponse(
                method="POST",
                path="/auth/action/init",
                status=200,
                problem="no challenge",
                mutating=False,
            )
        identifier = init.get("challengeIdentifier")
        if not identifier:
            raise DfnsBadResponse(
                method="POST",
                path="/auth/action/init",
                status=200,
                problem="no challengeIdentifier",
                mutating=False,
            )
        allowed = init.get("allowCredentials")
        keys = allowed.get("key") if isinstance(allowed, Mapping) else None
        if isinstance(keys, list) and keys:
            ids = {k.get("id") for k in keys if isinstance(k, Mapping)}
            if signer.credential_id not in ids:
                raise CredentialNotAllowed(
                    method=method, path=path, credential_id=signer.credential_id
                )
        result = await self._call(
            "POST",
            "/auth/action",
            body={
                "challengeIdentifier": identifier,
                "firstFactor": signer.assertion(str(init["challenge"])),
            },
            mutating=False,
            retry=False,
        )
        token = result.get("userAction") if isinstance(result, Mapping) else None
        if not isinstance(token, str) or not token:
            raise DfnsBadResponse(
                method="POST",
                path="/auth/action",
                status=200,
                problem="no userAction token",
                mutating=False,
            )
        return token

    # ----------------------------------------------------------------------- credentials

    async def create_credential_challenge(self, kind: str = "Key") -> CredentialChallenge:
        path = "/auth/credentials/init"
        data = await self._call("POST", path, body={"kind": kind}, mutating=False)
        return self._parse(CredentialChallenge.from_api, data, "POST", path, mutating=False)

    async def create_key_credential(self, new_signer: KeySigner, name: str) -> Credential:
        """Register `new_signer`'s key as a Key credential named `name` (credId =
        new_signer.credential_id). The attestation is signed by the NEW key; the request is
        signed by this client's signer (an existing, active credential)."""
        if self._signer is None:
            raise MissingSigner(method="POST", path="/auth/credentials")
        challenge = await self.create_credential_challenge("Key")
        path = "/auth/credentials"
        data = await self._call(
            "POST",
            path,
            body=_key_credential_body(challenge, new_signer, name),
            signed=True,
        )
        return self._parse(Credential.from_api, data, "POST", path, mutating=True)

    async def create_service_account_credential(
        self, public_key_pem: str, name: str | None = None
    ) -> Credential:
        """The newer endpoint: register a public key for the calling service account; the
        provider chooses the credential id."""
        path = "/auth/service-accounts/credentials"
        body: dict[str, Any] = {"publicKey": public_key_pem}
        if name is not None:
            body["name"] = name
        data = await self._call("POST", path, body=body, signed=True)
        return self._parse(Credential.from_api, data, "POST", path, mutating=True)

    async def list_credentials(self) -> list[Credential]:
        path = "/auth/credentials"
        data = await self._call("GET", path)
        return [
            self._parse(Credential.from_api, item, "GET", path, mutating=False)
            for item in self._items(data, "GET", path)
        ]

    async def activate_credential(self, credential_uuid: str) -> None:
        _segment(credential_uuid, "credential uuid")
        await self._call(
            "PUT",
            "/auth/credentials/activate",
            body={"credentialUuid": credential_uuid},
            signed=True,
        )

    async def deactivate_credential(self, credential_uuid: str) -> None:
        _segment(credential_uuid, "credential uuid")
        await self._call(
            "PUT",
            "/auth/credentials/deactivate",
            body={"credentialUuid": credential_uuid},
            signed=True,
        )

    async def delete_credential(self, credential_uuid: str) -> None:
        path = f"/auth/credentials/{_segment(credential_uuid, 'credential uuid')}"
        await self._call("DELETE", path, signed=True)

    async def create_credential_code(self, expiration: datetime) -> CredentialCode:
        """A one-time code (valid until `expiration`, at most a minute ahead) with which a new
        credential can be added without authentication."""
        path = "/auth/credentials/code"
        data = await self._call(
            "POST", path, body={"expiration": _iso_utc(expiration)}, signed=True
        )
        return self._parse(CredentialCode.from_api, data, "POST", path, mutating=True)

    async def code_challenge(
        self, code: str | CredentialCode, kind: str = "Key"
    ) -> CredentialChallenge:
        """Challenge With Code (unauthenticated)."""
        path = "/auth/credentials/code/init"
        data = await self._call(
            "POST",
            path,
            body={"code": _code_text(code), "credentialKind": kind},
            mutating=False,
            authenticated=False,
        )
        return self._parse(CredentialChallenge.from_api, data, "POST", path, mutating=False)

    async def create_credential_with_code(
        self, code: str | CredentialCode, new_signer: KeySigner, name: str
    ) -> Credential:
        """Create Credential With Code (unauthenticated, unsigned): register `new_signer`'s key."""
        challenge = await self.code_challenge(code, "Key")
        path = "/auth/credentials/code/verify"
        data = await self._call(
            "POST",
            path,
            body=_key_credential_body(challenge, new_signer, name),
            mutating=True,
            authenticated=False,
        )
        return self._parse(Credential.from_api, data, "POST", path, mutating=True)

    # ------------------------------------------------------------------ end users, passkeys

    async def delegated_login(self, username: str) -> DelegatedToken:
        """Delegated Login (service accounts only, signed): a token for the end user
        `username`, without the user's credentials. Use it with :meth:`as_user`."""
        if not isinstance(username, str) or not username:
            raise InvalidRequest("the username to log in is empty")
        path = "/auth/login/delegated"
        data = await self._call("POST", path, body={"username": username}, signed=True)
        token = data.get("token") if isinstance(data, Mapping) else None
        if not isinstance(token, str) or not token:
            raise DfnsBadResponse(
                method="POST", path=path, status=200, problem="no token", mutating=True
            )
        return DelegatedToken(token)

    async def list_user_credentials(self, user: DelegatedToken | str) -> list[Credential]:
        """The credentials (Key and Fido2) of the end user whose delegated token is `user`."""
        return await self.as_user(user).list_credentials()

    async def fido2_challenge(self, *, origin: str | None = None) -> CredentialChallenge:
        """Create Credential Challenge for a passkey: `raw` holds the creation options (rp,
        user, pubKeyCredParams, excludeCredentials, ...) for the user's browser. `origin` is
        the browser's origin, from which the provider picks the rp."""
        path = "/auth/credentials/init"
        data = await self._call("POST", path, body={"kind": "Fido2"}, mutating=False, origin=origin)
        return self._parse(CredentialChallenge.from_api, data, "POST", path, mutating=False)

    async def create_fido2_credential(
        self, challenge: CredentialChallenge, credential_info: Mapping[str, str], name: str
    ) -> Credential:
        """Create Credential for a passkey the user's device made (`credential_info`: credId,
        clientData, attestationData, base64url), signed by an existing credential of the user
        (this client's signer, or its relay for a client from :meth:`as_user`)."""
        path = "/auth/credentials"
        data = await self._call(
            "POST", path, body=_fido2_credential_body(challenge, credential_info, name), signed=True
        )
        return self._parse(Credential.from_api, data, "POST", path, mutating=True)

    async def fido2_code_challenge(
        self, code: str | CredentialCode, *, origin: str | None = None
    ) -> CredentialChallenge:
        """Challenge With Code for a passkey (unauthenticated), as seen from `origin`."""
        path = "/auth/credentials/code/init"
        data = await self._call(
            "POST",
            path,
            body={"code": _code_text(code), "credentialKind": "Fido2"},
            mutating=False,
            authenticated=False,
            origin=origin,
        )
        return self._parse(CredentialChallenge.from_api, data, "POST", path, mutating=False)

    async def create_fido2_credential_with_code(
        self, challenge: CredentialChallenge, credential_info: Mapping[str, str], name: str
    ) -> Credential:
        """Create Credential With Code for a passkey (unauthenticated, unsigned)."""
        path = "/auth/credentials/code/verify"
        data = await self._call(
            "POST",
            path,
            body=_fido2_credential_body(challenge, credential_info, name),
            mutating=True,
            authenticated=False,
        )
        return self._parse(Credential.from_api, data, "POST", path, mutating=True)

    # -------------------------------------------------------------------------- webhooks

    async def create_webhook(
        self,
        url: str,
        events: Sequence[str],
        description: str | None = None,
        status: str = "Enabled",
    ) -> tuple[Webhook, WebhookSecret]:
        """Create a webhook. Its secret is returned only here: store it at once (sealed)."""
        if isinstance(events, str):
            raise InvalidRequest("webhook events must be a list of event kinds (or ['*'])")
        path = "/webhooks"
        body: dict[str, Any] = {"url": url, "events": list(events), "status": status}
        if description is not None:
            body["description"] = description
        data = await self._call("POST", path, body=body, signed=True)
        webhook = self._parse(Webhook.from_api, data, "POST", path, mutating=True)
        secret = data.get("secret")
        if not isinstance(secret, str) or not secret:
            raise DfnsBadResponse(
                method="POST",
                path=path,
                status=200,
                problem=f"webhook {webhook.id} created without its secret",
                mutating=True,
            )
        return webhook, WebhookSecret(secret)

    async def list_webhooks(self) -> list[Webhook]:
        """Every webhook of the organisation (follows nextPageToken)."""
        path = "/webhooks"
        webhooks: list[Webhook] = []
        token: str | None = None
        seen: set[str] = set()
        for _ in range(_MAX_PAGES):
            params = {"paginationToken": token} if token else None
            data = await self._call("GET", path, params=params)
            webhooks.extend(
                self._parse(Webhook.from_api, item, "GET", path, mutating=False)
                for item in self._items(data, "GET", path)
            )
            next_token = data.get("nextPageToken")
            if not next_token:
                return webhooks
            token = str(next_token)
            if token in seen:
                break
            seen.add(token)
        raise DfnsBadResponse(
            method="GET", path=path, status=200, problem="pagination never ends", mutating=False
        )

    async def get_webhook(self, webhook_id: str) -> Webhook:
        path = f"/webhooks/{_segment(webhook_id, 'webhook id')}"
        data = await self._call("GET", path)
        return self._parse(Webhook.from_api, data, "GET", path, mutating=False)

    async def update_webhook(
        self,
        webhook_id: str,
        *,
        url: str | None = None,
        description: str | None = None,
        status: str | None = None,
        events: Sequence[str] | None = None,
    ) -> Webhook:
        path = f"/webhooks/{_segment(webhook_id, 'webhook id')}"
        body: dict[str, Any] = {}
        if url is not None:
            body["url"] = url
        if description is not None:
            body["description"] = description
        if status is not None:
            body["status"] = status
        if events is not None:
            if isinstance(events, str):
                raise InvalidRequest("webhook events must be a list of event kinds (or ['*'])")
            body["events"] = list(events)
        if not body:
            raise InvalidRequest(
                "update_webhook needs at least one of url, description, status, events"
            )
        data = await self._call("PUT", path, body=body, signed=True)
        return self._parse(Webhook.from_api, data, "PUT", path, mutating=True)

    async def delete_webhook(self, webhook_id: str) -> None:
        path = f"/webhooks/{_segment(webhook_id, 'webhook id')}"
        await self._call("DELETE", path, signed=True)

    async def ping_webhook(self, webhook_id: str) -> PingResult:
        """Ask the provider to deliver a test event now; the receiver's status comes back."""
        path = f"/webhooks/{_segment(webhook_id, 'webhook id')}/ping"
        data = await self._call("POST", path, signed=True, mutating=False)
        return self._parse(PingResult.from_api, data, "POST", path, mutating=False)

    async def list_webhook_events(
        self,
        webhook_id: str,
        *,
        limit: int | None = None,
        pagination_token: str | None = None,
    ) -> WebhookEventPage:
        """One page of delivery records; pass `next_page_token` back for the next."""
        path = f"/webhooks/{_segment(webhook_id, 'webhook id')}/events"
        params: dict[str, str] = {}
        if limit is not None:
            params["limit"] = str(limit)
        if pagination_token:
            params["paginationToken"] = pagination_token
        data = await self._call("GET", path, params=params or None)
        items = [
            self._parse(WebhookEvent.from_api, item, "GET", path, mutating=False)
            for item in self._items(data, "GET", path)
        ]
        next_token = data.get("nextPageToken")
        return WebhookEventPage(
            items=items, next_page_token=str(next_token) if next_token else None
        )

    async def get_webhook_event(self, webhook_id: str, event_id: str) -> WebhookEvent:
        path = (
            f"/webhooks/{_segment(webhook_id, 'webhook id')}"
            f"/events/{_segment(event_id, 'webhook event id')}"
        )
        data = await self._call("GET", path)
        return self._parse(WebhookEvent.from_api, data, "GET", path, mutating=False)


def _key_credential_body(
    challenge: CredentialChallenge, new_signer: KeySigner, name: str
) -> dict[str, Any]:
    """Create Credential's body for a Key credential, attested by the NEW key."""
    return {
        "challengeIdentifier": challenge.challenge_identifier,
        "credentialName": name,
        "credentialKind": "Key",
        "credentialInfo": new_signer.attestation(challenge.challenge),
    }


def _fido2_credential_body(
    challenge: CredentialChallenge, credential_info: Mapping[str, str], name: str
) -> dict[str, Any]:
    """Create Credential's body for a passkey made by the user's device."""
    info = {k: credential_info.get(k) for k in ("credId", "clientData", "attestationData")}
    if not all(isinstance(v, str) and v for v in info.values()):
        raise InvalidRequest(
            "a Fido2 credentialInfo needs credId, clientData and attestationData (base64url)"
        )
    return {
        "challengeIdentifier": challenge.challenge_identifier,
        "credentialName": name,
        "credentialKind": "Fido2",
        "credentialInfo": info,
    }


def _code_text(code: str | CredentialCode) -> str:
    text = code.code if isinstance(code, CredentialCode) else code
    if not text:
        raise InvalidRequest("the credential code is empty; create one with create_credential_code")
    return text

"""Typed errors of the Dfns client.

Every error is a :class:`keyturn.domain.errors.ProviderError` whose message is one line naming the
call (method and path), the status and the server's message, and what to do about it. Messages
never carry the bearer token, a user-action token, a webhook secret or key material: the server's
message is collapsed to one line, shortened, and scrubbed of the client's token before use.

`retryable` is True only when trying the same call again is safe and may succeed (429, 5xx,
timeouts, connection errors, a pending approval). `outcome_unknown` is True when a state-changing
call may have been applied before it failed (5xx, a read timeout or a dropped connection after the
request was sent, a pending approval), so the caller must reconcile with the provider first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from keyturn.domain.errors import ProviderError
from keyturn.domain.retry import retryable_status

_MAX_SERVER_MESSAGE = 200
_WS = re.compile(r"\s+")

_HINTS: dict[int, str] = {
    400: "the request was rejected as invalid; fix it before trying again",
    401: (
        "authentication failed: check the access token, and that the signing credential is "
        "active and its private key matches"
    ),
    403: (
        "forbidden: the caller lacks the permission, or the user action does not cover this request"
    ),
    404: "not found: check the id",
    405: "method not allowed: check the API base URL",
    409: "conflict with the provider's current state; reconcile before trying again",
}


def clean_server_text(text: object, secrets: Iterable[str] = ()) -> str:
    """One line, at most 200 characters, with every known secret replaced by `***`."""
    out = _WS.sub(" ", str(text)).strip()
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, "***")
    if len(out) > _MAX_SERVER_MESSAGE:
        out = out[: _MAX_SERVER_MESSAGE - 1] + "…"
    return out


class DfnsError(ProviderError):
    """Base of the Dfns client's errors; `method` and `path` name the call that failed."""

    def __init__(
        self,
        message: str,
        *,
        method: str,
        path: str,
        retryable: bool,
        status: int | None = None,
        code: str | None = None,
        outcome_unknown: bool = False,
    ) -> None:
        self.method = method
        self.path = path
        super().__init__(
            message,
            retryable=retryable,
            status=status,
            code=code,
            outcome_unknown=outcome_unknown,
        )


class DfnsApiError(DfnsError):
    """The API answered with an error status.

    4xx other than 429 is not retryable (the same request would fail the same way); 5xx is
    retryable, and for a state-changing call its outcome is unknown.
    """

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        error_id: str | None,
        *,
        method: str = "",
        path: str = "",
        mutating: bool = False,
    ) -> None:
        self.server_message = message
        self.error_id = error_id
        retryable = retryable_status(status)
        outcome_unknown = status >= 500 and mutating
        details = []
        if code:
            details.append(f"code {code}")
        if error_id:
            details.append(f"error id {error_id}")
        detail_text = f" ({', '.join(details)})" if details else ""
        server = f": {message}" if message else ""
        if status >= 500:
            hint = "a server error; retry later"
            if mutating:
                hint += (
                    " (the change may have been applied: run `keyturn reconcile` before retrying)"
                )
        elif status == 429:
            hint = "rate limited; retry with backoff"
        else:
            hint = _HINTS.get(status, "not retryable; check the request")
        text = f"Dfns {method} {path} failed with {status}{server}{detail_text}; {hint}"
        super().__init__(
            text,
            method=method,
            path=path,
            retryable=retryable,
            status=status,
            code=code,
            outcome_unknown=outcome_unknown,
        )


class DfnsRateLimited(DfnsApiError):
    """429: the organisation's request rate is exceeded. Retryable with backoff; nothing applied."""

    def __init__(
        self,
        code: str | None,
        message: str,
        error_id: str | None,
        *,
        method: str = "",
        path: str = "",
        mutating: bool = False,
    ) -> None:
        super().__init__(429, code, message, error_id, method=method, path=path, mutating=mutating)


class DfnsTimeout(DfnsError):
    """The call did not complete within the client's timeout.

    A connect or pool timeout means the request was never sent; a read or write timeout on a
    state-changing call leaves its outcome unknown.
    """

    def __init__(
        self, *, method: str, path: str, phase: str, seconds: float, mutating: bool
    ) -> None:
        self.phase = phase
        self.seconds = seconds
        sent = phase in ("read", "write")
        outcome_unknown = mutating and sent
        if outcome_unknown:
            hint = "the change may have been applied: run `keyturn reconcile` before retrying"
        else:
            hint = "nothing was applied; retry later"
        super().__init__(
            f"Dfns {method} {path} timed out ({phase} timeout after {seconds:g} s); {hint}",
            method=method,
            path=path,
            retryable=True,
            code="timeout",
            outcome_unknown=outcome_unknown,
        )


class DfnsConnectionError(DfnsError):
    """The connection failed. If it failed after the request was sent, a state-changing call's
    outcome is unknown; a refused connection applied nothing."""

    def __init__(
        self, *, method: str, path: str, reason: str, sent: bool, mutating: bool, base_url: str
    ) -> None:
        self.reason = reason
        outcome_unknown = mutating and sent
        if outcome_unknown:
            hint = "the change may have been applied: run `keyturn reconcile` before retrying"
        elif sent:
            hint = "retry later"
        else:
            hint = f"nothing was applied; check that {base_url} is reachable, then retry"
        super().__init__(
            f"Dfns {method} {path}: connection failed ({reason}); {hint}",
            method=method,
            path=path,
            retryable=True,
            code="connection",
            outcome_unknown=outcome_unknown,
        )


class PolicyPending(DfnsError):
    """202: a policy requires approval and the request is waiting for it. Never a success.

    Retryable (ask again later), and for a state-changing call the outcome is unknown: once
    approved, the provider applies the request, so reconcile before sending it again.
    """

    def __init__(
        self, *, method: str, path: str, approval: Mapping[str, Any], mutating: bool
    ) -> None:
        self.approval: dict[str, Any] = dict(approval)
        approval_id = approval.get("id") or approval.get("approvalId")
        self.approval_id: str | None = str(approval_id) if approval_id else None
        status = approval.get("status")
        self.approval_status: str | None = str(status) if status else None
        which = f" {self.approval_id}" if self.approval_id else ""
        super().__init__(
            f"Dfns {method} {path} is waiting for policy approval{which}; it has not been "
            "applied yet: get it approved (or denied), then run `keyturn reconcile` before "
            "retrying",
            method=method,
            path=path,
            retryable=True,
            status=202,
            code="policy_pending",
            outcome_unknown=mutating,
        )


class DfnsBadResponse(DfnsError):
    """A success status with a body the client cannot use (not JSON, or a required field missing).
    Not retryable: a human should look; a state-changing call's outcome is unknown."""

    def __init__(
        self, *, method: str, path: str, status: int, problem: str, mutating: bool
    ) -> None:
        hint = (
            "the change may have been applied: run `keyturn reconcile` before retrying"
            if mutating
            else "check that the base URL points at the Dfns API"
        )
        super().__init__(
            f"Dfns {method} {path} answered {status} with an unusable body ({problem}); {hint}",
            method=method,
            path=path,
            retryable=False,
            status=status,
            code="bad_response",
            outcome_unknown=mutating,
        )


class MissingSigner(DfnsError):
    """A state-changing call on a client that has no signer."""

    def __init__(self, *, method: str, path: str) -> None:
        super().__init__(
            f"Dfns {method} {path} needs a user-action signature but this client has no signer; "
            "pass signer=KeySigner.from_pem(...) or use client.with_signer(...)",
            method=method,
            path=path,
            retryable=False,
            code="signer_required",
        )


class CredentialNotAllowed(DfnsError):
    """The server's user-action challenge does not list the signer's credential as usable."""

    def __init__(self, *, method: str, path: str, credential_id: str) -> None:
        super().__init__(
            f"Dfns {method} {path}: credential {credential_id} is not among the active Key "
            "credentials the server allows to sign (allowCredentials.key); it is inactive, "
            "deleted or belongs to another principal: sign with an active credential",
            method=method,
            path=path,
            retryable=False,
            status=None,
            code="credential_not_allowed",
        )


class InvalidSigningKey(ProviderError):
    """A signing key that cannot be used (not a PEM private key, or an unsupported algorithm)."""

    def __init__(self, credential_id: str, problem: str) -> None:
        self.credential_id = credential_id
        super().__init__(
            f"signing key for credential {credential_id} cannot be used: {problem}",
            retryable=False,
            code="invalid_signing_key",
        )


class InvalidRequest(ProviderError):
    """A call the client refuses to make because an argument is wrong (no request was sent)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False, code="invalid_request")

"""Typed errors of the domain. Messages never carry secret material."""

from __future__ import annotations


class KeyturnError(Exception):
    """Base of every error keyturn raises on purpose; its message is one line for a human."""


class IllegalTransition(KeyturnError):
    """A trigger that the lifecycle graph does not allow from the current state."""

    def __init__(self, state: str, trigger: str, allowed: list[str]) -> None:
        self.state = state
        self.trigger = trigger
        self.allowed = allowed
        allowed_text = ", ".join(allowed) if allowed else "none (the rotation is finished)"
        super().__init__(
            f"cannot {trigger} a rotation in state {state}; allowed from {state}: {allowed_text}"
        )


class TransitionRefused(KeyturnError):
    """A trigger the graph allows, refused by a guard (with the reason)."""

    def __init__(self, state: str, trigger: str, reason: str) -> None:
        self.state = state
        self.trigger = trigger
        self.reason = reason
        super().__init__(f"cannot {trigger} a rotation in state {state}: {reason}")


class StaleVersion(KeyturnError):
    """A compare-and-set found another version: someone else changed the rotation (fencing)."""

    def __init__(self, rotation_id: str, expected: int) -> None:
        self.rotation_id = rotation_id
        self.expected = expected
        super().__init__(
            f"rotation {rotation_id} changed since version {expected}; this writer lost its lease"
        )


class NotFound(KeyturnError):
    """A named thing (credential, rotation) that does not exist."""


class AlreadyRotating(KeyturnError):
    """The managed credential already has an unfinished rotation."""

    def __init__(self, credential: str, rotation_id: str | None = None) -> None:
        self.credential = credential
        self.rotation_id = rotation_id
        where = f" ({rotation_id})" if rotation_id else ""
        super().__init__(
            f"credential {credential} already has an unfinished rotation{where}; "
            "finish, roll back or cancel it first"
        )


class StoreUnavailable(KeyturnError):
    """The database cannot be reached right now (connection refused or lost, server restarting).

    Whether the last write was applied is unknown; a worker abandons the rotation it was
    working on (its lease expires and the rotation is claimed again) and backs off.
    """

    retryable = True


class ConfigError(KeyturnError):
    """Configuration that cannot be used; the message names the file, the key and the fix."""


class SecretError(KeyturnError):
    """Encrypted material that cannot be opened (wrong master key, tampering, purged)."""


class StepError(KeyturnError):
    """A step failed. `retryable` says whether trying again later is safe."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        self.retryable = retryable
        super().__init__(message)


class ProviderError(KeyturnError):
    """A provider call failed.

    `retryable` is True only when trying again is safe and may succeed (timeouts, connection
    errors, 429, 5xx, a pending approval). `outcome_unknown` is True when the provider may have
    applied the change before failing (a timeout or a dropped connection on a state-changing
    call, a 5xx), so the caller must reconcile before acting again.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        code: str | None = None,
        outcome_unknown: bool = False,
    ) -> None:
        self.retryable = retryable
        self.status = status
        self.code = code
        self.outcome_unknown = outcome_unknown
        super().__init__(message)

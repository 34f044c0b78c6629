"""A worker's lease on one rotation, kept on the monotonic clock: when to renew it, and the
fence every outside request passes (a worker frozen past its lease never acts again)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from keyturn.domain.errors import KeyturnError


class LeaseLost(KeyturnError):
    """The lease could not be kept; the rotation is abandoned to whoever holds it now."""


class Lease:
    def __init__(
        self,
        rotation_id: str,
        owner: str,
        *,
        seconds: float,
        margin: float,
        leased_at: float | None = None,
    ) -> None:
        self.rotation_id = rotation_id
        self.owner = owner
        self.seconds = seconds
        self.margin = margin
        #: The lease's end on the monotonic clock, counted from before the claim was sent.
        self.deadline = (leased_at if leased_at is not None else time.monotonic()) + seconds

    def updates(self, now: datetime) -> dict[str, Any]:
        """The rotation fields that (re)take the lease."""
        return {
            "lease_owner": self.owner,
            "lease_expires_at": now + timedelta(seconds=self.seconds),
        }

    def renewed(self, started: float) -> None:
        """A write that took the lease committed; it was sent at `started` (monotonic)."""
        self.deadline = started + self.seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def wants_renewal(self) -> bool:
        return self.left() < self.seconds / 2

    def check(self, doing: str = "act") -> None:
        if self.left() < self.margin:
            raise LeaseLost(f"rotation {self.rotation_id}: lease too close to expiry to {doing}")

    def fence(self) -> None:
        """Before every request to the outside world: the lease must still have its margin."""
        if self.left() < self.margin:
            raise LeaseLost(
                f"rotation {self.rotation_id}: the lease is no longer safely held; "
                "not contacting the provider"
            )

"""Delivering the notification outbox: a loop of its own in every worker and in `keyturn serve`
(when sinks are configured), never awaited by a rotation's steps, so a sink that is down or
slow delays nothing but its own notifications.

One round: note rotations whose holder was lost without a takeover (an event and its
notification, once per lost lease), fan new notifications out to the sinks whose filter takes
them, claim due deliveries (a lease, so one process sends each), send them concurrently (each
within its timeout), and record every attempt. At least once: a process killed mid-send leaves
its lease to expire and another sends again. 429, 5xx and network errors are retried with
exponential backoff and jitter until ``retry_for_seconds`` after the first attempt, then the
delivery is failed (and visible in `keyturn notifications list`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from keyturn.domain.errors import KeyturnError
from keyturn.domain.model import Event, Rotation
from keyturn.domain.notify import OPENING, RESOLVING, NoticeKind
from keyturn.engine.run import db
from keyturn.ports import Clock, Delivery, DeliveryAttempt, OutboxStore, SendResult, Sink

log = structlog.get_logger("keyturn.notify")

_OPENING = frozenset(k.value for k in OPENING)
_RESOLVING = frozenset(k.value for k in RESOLVING)


@dataclass(frozen=True)
class DeliverySettings:
    poll_seconds: float = 1.0
    #: Deliveries claimed (and sent concurrently) per round.
    batch: int = 20
    #: Each request's timeout.
    timeout_seconds: float = 10.0
    #: Retry a delivery this long after its first attempt, then mark it failed.
    retry_for_seconds: float = 3600.0
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    #: A lease expired this long ago with no takeover is a lost holder (None: not watched).
    holder_lost_after_seconds: float | None = 60.0
    #: Attempts, and deliveries and notifications done with, are deleted after this long.
    keep_days: float = 30.0


def routes(sinks: Sequence[Sink]) -> Any:
    """The fan-out's routing: the sinks whose filter takes the kind, and for the end of a
    rotation also the paging sinks that took one of its opening notifications."""

    def route(payload: dict[str, Any], opened: frozenset[str]) -> list[str]:
        kind = str(payload.get("kind"))
        out = []
        for sink in sinks:
            if kind in sink.events or (kind in _RESOLVING and sink.pages and sink.name in opened):
                out.append(sink.name)
        return out

    return route


#: Opens a sealed secret by id (blocking: the store and the vault); raises when it cannot.
Reveal = Callable[[str], str]

#: What a sink receives instead of a link that cannot be opened.
NO_LINK = (
    "the link could not be opened (its secret is purged or missing): send the person a new one"
)


class Deliverer:
    def __init__(
        self,
        outbox: OutboxStore,
        sinks: Sequence[Sink],
        clock: Clock,
        settings: DeliverySettings,
        owner: str,
        reveal: Reveal | None = None,
    ) -> None:
        """`reveal` opens the sealed link a person's notification names (its ``link_ref``)
        at send time, for what the sink receives only (None: sent without the link)."""
        self.reveal = reveal
        self.outbox = outbox
        self.sinks = {s.name: s for s in sinks}
        self.clock = clock
        self.settings = settings
        self.owner = owner
        self._route = routes(list(sinks))
        self._last_sweep = float("-inf")
        self._last_prune = float("-inf")
        self.sent = 0

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=2 * self.settings.timeout_seconds + 5)

    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver until `stopping` is set."""
        log.info("delivering notifications", owner=self.owner, sinks=sorted(self.sinks))
        outage = 0
        while not stopping.is_set():
            try:
                busy = await self.round()
                outage = 0
            except KeyturnError as exc:
                outage += 1
                log.warning("notification delivery: the store is unavailable", error=str(exc))
                busy = 0
            except Exception as exc:  # a bug: keep delivering, and say so
                log.error("notification delivery failed", error=type(exc).__name__)
                busy = 0
            if busy:
                continue
            delay = self.settings.poll_seconds * (2 ** min(outage, 4))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=delay)

    async def drain(self, seconds: float) -> int:
        """Deliver what is due now, for at most `seconds` (an --until-idle worker's end)."""
        deadline = time.monotonic() + seconds
        total = 0
        while time.monotonic() < deadline:
            try:
                done = await asyncio.wait_for(self.round(), timeout=deadline - time.monotonic())
            except (TimeoutError, KeyturnError):
                break
            if not done:
                break
            total += done
        return total

    async def round(self) -> int:
        """One pass; how many notifications were fanned out or deliveries attempted."""
        now = self.clock.now()
        await self._sweep(now)
        await self._prune(now)
        fanned = await db(self.outbox.fan_out, self._route, now, 100)
        claimed = await db(
            self.outbox.claim_deliveries, self.owner, now, now + self.lease, self.settings.batch
        )
        if claimed:
            await asyncio.gather(*(self._deliver(d) for d in claimed))
        return fanned + len(claimed)

    async def aclose(self) -> None:
        for sink in self.sinks.values():
            try:
                await sink.aclose()
            except Exception:  # closing decides nothing
                log.warning("could not close a sink", sink=sink.name)

    async def _prune(self, now: datetime) -> None:
        """Once an hour: a re-sent alert adds an attempt a minute, so the outbox is bounded."""
        if time.monotonic() - self._last_prune < 3600:
            return
        self._last_prune = time.monotonic()
        pruned = await db(self.outbox.prune, now - timedelta(days=self.settings.keep_days))
        if pruned:
            log.info("pruned the notification outbox", rows=pruned)

    # ------------------------------------------------------------------ lost holders

    async def _sweep(self, now: datetime) -> None:
        after = self.settings.holder_lost_after_seconds
        if after is None:
            return
        every = max(self.settings.poll_seconds, min(10.0, after / 2))
        if time.monotonic() - self._last_sweep < every:
            return
        self._last_sweep = time.monotonic()
        for rotation in await db(self.outbox.lost_holders, now - timedelta(seconds=after), 50):
            if await db(self.outbox.record_lost_holder, rotation, self._lost_event(rotation, now)):
                log.warning(
                    "holder lost without a takeover",
                    rotation=rotation.id,
                    holder=rotation.lease_owner,
                )

    def _lost_event(self, rotation: Rotation, now: datetime) -> Event:
        expired = rotation.lease_expires_at
        when = expired.strftime("%Y-%m-%d %H:%M:%S UTC") if expired else "?"
        return Event(
            rotation_id=rotation.id,
            at=now,
            kind="run",
            actor=self.owner,
            trigger="lease",
            from_state=rotation.state.value,
            reason=(
                f"the lease of {rotation.lease_owner} expired at {when} and no worker took the "
                "rotation over; start a worker (`keyturn worker`) or see `keyturn workers`"
            ),
            detail={"status": NoticeKind.HOLDER_LOST.value, "from": rotation.lease_owner},
        )

    # ------------------------------------------------------------------ one delivery

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        s = self.settings
        delay = min(s.backoff_max_seconds, s.backoff_base_seconds * 2 ** max(0, attempts))
        delay = float(delay) * (0.5 + random.random() / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, s.backoff_max_seconds))
        return delay

    async def _with_link(self, delivery: Delivery) -> dict[str, Any]:
        """The payload a sink receives: a person's notification gets its ``link``, opened now
        (the outbox keeps only the secret's id); one that cannot be opened is sent without it
        and says so."""
        payload = delivery.payload
        ref = payload.get("link_ref")
        if not ref:
            return payload
        link: str | None = None
        if self.reveal is not None:
            try:
                link = await db(self.reveal, str(ref))
            except Exception as exc:  # purged, missing, undecryptable: never its message
                log.warning(
                    "a notification's link could not be opened",
                    notification=delivery.notification_id,
                    sink=delivery.sink,
                    error=type(exc).__name__,
                )
        if link is not None:
            return {**payload, "link": link}
        return {
            **payload,
            "link": None,
            "link_missing": NO_LINK,
            "summary": f"{payload.get('summary', '')} ({NO_LINK})",
        }

    async def _send(self, sink: Sink, delivery: Delivery) -> SendResult:
        resend = delivery.status == "firing"
        try:
            payload = await self._with_link(delivery)
            return await asyncio.wait_for(
                sink.send(payload, resend=resend),
                timeout=self.settings.timeout_seconds + 1,
            )
        except TimeoutError:
            return SendResult(
                False, error=f"timed out after {self.settings.timeout_seconds:g} s", retryable=True
            )
        except Exception as exc:  # a sink bug: never its message (it may hold a secret)
            return SendResult(False, error=f"{type(exc).__name__} in the sink", retryable=True)

    async def _deliver(self, delivery: Delivery) -> None:
        sink = self.sinks.get(delivery.sink)
        started = time.monotonic()
        if sink is None:  # configured in another process, not here: leave it to that one
            result = SendResult(
                False, error=f"sink {delivery.sink} is not configured in this process"
            )
            later = self.clock.now() + timedelta(seconds=60)
            await self._finish(delivery, "skipped", result, started, delivery.status, later)
            return
        result = await self._send(sink, delivery)
        now = self.clock.now()
        resend = delivery.status == "firing"
        opens, resolves = delivery.kind in _OPENING, delivery.kind in _RESOLVING
        if result.ok:
            self.sent += 1
            if sink.resend_seconds and opens:
                after = now + timedelta(seconds=sink.resend_seconds)
                await self._finish(
                    delivery,
                    "resent" if resend else "sent",
                    result,
                    started,
                    "firing",
                    after,
                    close=not resend,
                )
                return
            await self._finish(
                delivery, "sent", result, started, "sent", None, close=resolves and sink.pages
            )
            return
        if resend:  # a re-send that failed: try again sooner, still firing
            assert sink.resend_seconds is not None
            again = min(sink.resend_seconds, self._backoff(0, result.retry_after))
            await self._finish(
                delivery, "retry", result, started, "firing", now + timedelta(seconds=again)
            )
            return
        delay = self._backoff(delivery.attempts, result.retry_after)
        first = delivery.first_attempt_at or now
        within = (now - first).total_seconds() + delay <= self.settings.retry_for_seconds
        if result.retryable and within:
            await self._finish(
                delivery, "retry", result, started, "pending", now + timedelta(seconds=delay)
            )
            return
        if result.retryable:
            result = SendResult(
                False,
                status_code=result.status_code,
                error=f"{result.error} (gave up after {self.settings.retry_for_seconds:g} s "
                "of retries)",
            )
        # a resolve that cannot be sent still ends the re-sends of what it resolves
        await self._finish(
            delivery, "failed", result, started, "failed", None, close=resolves and sink.pages
        )

    async def _finish(
        self,
        delivery: Delivery,
        outcome: str,
        result: SendResult,
        started: float,
        status: str,
        next_at: datetime | None,
        *,
        close: bool = False,
    ) -> None:
        now = self.clock.now()
        attempt = DeliveryAttempt(
            delivery_id=delivery.id,
            at=now,
            owner=self.owner,
            outcome=outcome,
            status_code=result.status_code,
            error=result.error,
            duration_ms=round((time.monotonic() - started) * 1000),
            sink=delivery.sink,
        )
        fields = {
            "sink": delivery.sink,
            "kind": delivery.kind,
            "rotation": delivery.rotation_id,
            "notification": delivery.notification_id,
            "outcome": outcome,
            "status_code": result.status_code,
        }
        if outcome in ("sent", "resent"):
            log.info("notification sent", **fields)
        elif outcome == "failed":
            log.error("notification failed", error=result.error, **fields)
        elif outcome == "retry":
            log.warning("notification not delivered; will retry", error=result.error, **fields)
        try:
            kept = await db(
                self.outbox.finish_delivery,
                delivery,
                self.owner,
                attempt,
                status=status,
                next_attempt_at=next_at,
                close_firing=close,
            )
        except KeyturnError as exc:  # its lease expires and it is sent again (at least once)
            log.warning("could not record a notification attempt", error=str(exc), **fields)
            return
        if not kept:
            log.warning("notification lease lost (another process took it over)", **fields)

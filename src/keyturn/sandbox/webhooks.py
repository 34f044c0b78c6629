"""Webhook delivery: real HTTP POSTs, HMAC-signed, retried, logged in batches.

One shared `httpx.AsyncClient` (keep-alive) and a fixed pool of worker tasks bound the
concurrency. Delivery records go to an in-memory buffer flushed to SQLite a few times a second
(they are a log, not an acknowledged API change). Retries of failed deliveries follow the Dfns
schedule (+1 min, +12 min, +2 h, +1 day) divided by the time scale; each retry is a new event id
with `retryOf` naming the first attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
import httpx

from keyturn.sandbox.crypto import new_id, webhook_signature
from keyturn.sandbox.store import DeliveryRecord, Store, Webhook

log = logging.getLogger("keyturn.sandbox.webhooks")

RETRY_DELAYS_SECONDS = (60.0, 12 * 60.0, 2 * 3600.0, 24 * 3600.0)
SYNTHETIC_KIND = "wallet.blockchainevent.detected"
PING_KIND = "webhook.ping"


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    webhook_id: str
    kind: str
    date: str
    data: dict[str, Any]
    attempt: int = 1
    retry_of: str | None = None


@dataclass
class WebhookStats:
    delivered: int = 0
    failed: int = 0
    in_flight: int = 0  # posts sent and not yet answered
    event_ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the last few failures, for a test's message


class Deliveries:
    def __init__(
        self,
        store: Store,
        *,
        time_scale: float = 1.0,
        concurrency: int = 16,
        queue_size: int = 50_000,
        timeout: float = 5.0,
    ) -> None:
        self.store = store
        self.time_scale = time_scale
        self.concurrency = concurrency
        self.timeout = timeout
        self.webhooks: dict[str, Webhook] = {}
        self.stats: dict[str, WebhookStats] = {}
        self.events_emitted = 0
        self.events_dropped = 0
        self.retries_scheduled = 0
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self._retry_heap: list[tuple[float, int, Job]] = []
        self._retry_seq = itertools.count()
        self._retry_wakeup = asyncio.Event()
        self._buffer: list[DeliveryRecord] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._generator_task: asyncio.Task[None] | None = None
        self.event_rate = 0.0
        self._client: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------------------- lifecycle

    async def start(self, *, event_rate: float) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(
                max_connections=self.concurrency * 2, max_keepalive_connections=self.concurrency
            ),
            follow_redirects=False,
        )
        for _ in range(self.concurrency):
            self._tasks.append(asyncio.create_task(self._worker()))
        self._tasks.append(asyncio.create_task(self._retry_scheduler()))
        self._tasks.append(asyncio.create_task(self._flusher()))
        self.set_event_rate(event_rate)

    def set_event_rate(self, rate: float) -> None:
        """Emit `rate` synthetic events per second from now on (0 stops the stream)."""
        if self._generator_task is not None:
            self._generator_task.cancel()
            self._generator_task = None
        self.event_rate = rate
        if rate > 0:
            self._generator_task = asyncio.create_task(self._generator(rate))

    async def stop(self) -> None:
        self.set_event_rate(0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.flush()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def flush(self) -> None:
        batch, self._buffer = self._buffer, []
        if batch:
            await anyio.to_thread.run_sync(self.store.append_deliveries, batch)

    # ---------------------------------------------------------------------------------- emit

    def emit(self, kind: str | None, data: dict[str, Any], *, org_id: str | None = None) -> int:
        """Queue one event for every enabled webhook that wants `kind`; return how many.

        `kind=None` (synthetic load) reaches every enabled webhook, as a kind it subscribed to.
        """
        self.events_emitted += 1
        date = utc_now_iso()
        queued = 0
        for webhook in list(self.webhooks.values()):
            if webhook.status != "Enabled":
                continue
            if kind is None:
                event_kind = SYNTHETIC_KIND if webhook.wants(SYNTHETIC_KIND) else webhook.events[0]
            elif webhook.wants(kind):
                event_kind = kind
            else:
                continue
            if org_id is not None and webhook.org_id != org_id:
                continue
            try:
                self._queue.put_nowait(Job(webhook.id, event_kind, date, dict(data)))
            except asyncio.QueueFull:
                self.events_dropped += 1
                continue
            queued += 1
        return queued

    async def ping(self, webhook: Webhook) -> tuple[str, str | None]:
        """Deliver one test event now; (receiver's status code or "", error or None)."""
        job = Job(webhook.id, PING_KIND, utc_now_iso(), {"message": "ping from the sandbox"})
        return await self._deliver(webhook, job, retry=False)

    # ------------------------------------------------------------------------------- workers

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                webhook = self.webhooks.get(job.webhook_id)
                if webhook is None or webhook.status != "Enabled":
                    continue
                await self._deliver(webhook, job, retry=True)
            except Exception:  # a worker must survive anything one delivery does
                log.exception("webhook delivery crashed")
            finally:
                self._queue.task_done()

    async def _deliver(self, webhook: Webhook, job: Job, *, retry: bool) -> tuple[str, str | None]:
        assert self._client is not None, "deliveries not started"
        event_id = new_id("whe", 12)
        timestamp_sent = int(time.time())
        event: dict[str, Any] = {
            "id": event_id,
            "kind": job.kind,
            "date": job.date,
            "data": job.data,
            "status": "pending",
            "timestampSent": timestamp_sent,
            "deliveryAttempt": job.attempt,
        }
        if job.retry_of is not None:
            event["retryOf"] = job.retry_of
        body = json.dumps(event, separators=(",", ":")).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "X-DFNS-WEBHOOK-SIGNATURE": webhook_signature(webhook.secret, body),
        }
        status = ""
        error: str | None = None
        stats = self.stats.setdefault(webhook.id, WebhookStats())
        stats.in_flight += 1
        try:
            response = await self._client.post(webhook.url, content=body, headers=headers)
            status = str(response.status_code)
            if response.status_code != 200:
                error = f"receiver answered {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
        finally:
            stats.in_flight -= 1
        delivered = error is None
        stats.event_ids.append(event_id)
        if delivered:
            stats.delivered += 1
        else:
            stats.failed += 1
            stats.errors = [*stats.errors[-4:], f"{event_id} attempt {job.attempt}: {error}"]
        self._buffer.append(
            DeliveryRecord(
                event_id=event_id,
                webhook_id=webhook.id,
                kind=job.kind,
                date=job.date,
                data=job.data,
                status=status,
                error=error,
                delivery_attempt=job.attempt,
                retry_of=job.retry_of,
                timestamp_sent=timestamp_sent,
                delivered=delivered,
                recorded_at=utc_now_iso(),
            )
        )
        if not delivered and retry and job.attempt <= len(RETRY_DELAYS_SECONDS):
            delay = RETRY_DELAYS_SECONDS[job.attempt - 1] / self.time_scale
            retry_job = Job(
                webhook_id=job.webhook_id,
                kind=job.kind,
                date=job.date,
                data=job.data,
                attempt=job.attempt + 1,
                retry_of=job.retry_of or event_id,
            )
            heapq.heappush(
                self._retry_heap, (time.monotonic() + delay, next(self._retry_seq), retry_job)
            )
            self.retries_scheduled += 1
            self._retry_wakeup.set()
        return status, error

    async def _retry_scheduler(self) -> None:
        while True:
            now = time.monotonic()
            while self._retry_heap and self._retry_heap[0][0] <= now:
                _, _, job = heapq.heappop(self._retry_heap)
                try:
                    self._queue.put_nowait(job)
                except asyncio.QueueFull:
                    self.events_dropped += 1
            wait = 1.0
            if self._retry_heap:
                wait = max(0.0, min(wait, self._retry_heap[0][0] - time.monotonic()))
            self._retry_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_wakeup.wait(), timeout=wait)

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            try:
                await self.flush()
            except Exception:
                log.exception("could not write webhook delivery records")

    async def _generator(self, rate: float) -> None:
        started = time.monotonic()
        emitted = 0
        tick = min(0.01, 1.0 / rate)
        sequence = 0
        while True:
            due = int((time.monotonic() - started) * rate) - emitted
            for _ in range(max(0, due)):
                sequence += 1
                self.emit(
                    None,
                    {"sequence": sequence, "walletId": "wa-sandbox", "synthetic": True},
                )
                emitted += 1
            await asyncio.sleep(tick)

    # --------------------------------------------------------------------------------- state

    def snapshot(self, *, with_events: bool) -> dict[str, Any]:
        deliveries: dict[str, Any] = {}
        for webhook_id, stats in self.stats.items():
            entry: dict[str, Any] = {
                "delivered": stats.delivered,
                "failed": stats.failed,
                "in_flight": stats.in_flight,
                "errors": list(stats.errors),
            }
            if with_events:
                entry["event_ids"] = list(stats.event_ids)
            deliveries[webhook_id] = entry
        return deliveries

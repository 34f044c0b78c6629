"""A provider's request budget shared by every process that uses the same database.

`requests_per_minute` of a provider is the budget of the whole installation: every worker
process (and every CLI command) on the database takes its requests from one row of
``rate_budgets``. The arithmetic is the in-process budget's (GCRA: `burst` requests at once,
then one every `interval` seconds), but the theoretical arrival time (``tat``) lives in the row,
and each request reserves its slot with one atomic ``UPDATE ... RETURNING`` on the database's
clock, then sleeps until that slot. No process needs to know how many others there are, and a
process that has less work leaves the rest of the budget to the others.

A 429 pauses everyone: the pause (``paused_until``) and its exponential backoff (``penalty``)
are stored in the same row, and every reservation returns them, so every process waits for the
pause within one request. A pause already in force is not lengthened by the 429s of requests
sent before it began, and only a request sent after it ended resets the backoff.

The database round trip runs on a thread of its own (one per budget, so it never waits behind
the store's threads and never blocks the event loop). When the database cannot be used (down,
restarting, not migrated), the budget does not fail the request: it falls back to an
in-process budget for this process's recent share of the rate (the share of the row's
reservations it made in the last minute), and tries the database again after a backoff.

The row is soft state: on PostgreSQL its connection commits without waiting for the WAL flush
(``synchronous_commit = off`` for this connection only): a crash of the server can lose the
last few milliseconds of reservations, which costs a few requests of headroom, never safety.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Engine,
    String,
    Table,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from keyturn.adapters.store.models import metadata
from keyturn.adapters.store.sql import make_engine, normalize_url
from keyturn.ports import RequestBudget

log = structlog.get_logger("keyturn.budget")

#: One row per provider (declared on the store's metadata so that Alembic's comparison sees
#: it; created by migration 0003). Times are seconds since the epoch on the database's clock.
rate_budgets_t = Table(
    "rate_budgets",
    metadata,
    Column("provider", String(), primary_key=True),
    #: The theoretical arrival time of the next request (GCRA).
    Column("tat", Double(), nullable=False, server_default=text("0")),
    #: No request starts before this (a 429 was answered).
    Column("paused_until", Double(), nullable=False, server_default=text("0")),
    #: The current pause length; doubled by each 429 after a pause, reset by a success.
    Column("penalty", Double(), nullable=False, server_default=text("0")),
    #: Slots reserved and 429s reported, by every process (for the share and for operators).
    Column("granted", BigInteger(), nullable=False, server_default=text("0")),
    Column("rate_limited", BigInteger(), nullable=False, server_default=text("0")),
)

#: Seconds a statement (or a connection attempt) of the budget may take before it counts as
#: the database being unavailable.
DB_TIMEOUT_SECONDS = 3.0
#: After a failure the database is tried again after this, doubled per failure, capped.
RETRY_MIN_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
#: The window over which this process's share of the budget is measured.
SHARE_WINDOW_SECONDS = 60.0
#: The least share a fallback budget gets (a process that was idle may have work now).
MIN_SHARE = 0.1
#: Backoff after a 429 (as the in-process budget's): the first pause, doubled per 429, capped.
PAUSE_MIN_SECONDS = 1.0
PAUSE_MAX_SECONDS = 30.0


@dataclass(frozen=True)
class _Slot:
    """What a reservation returns: the row after it, and the database's clock."""

    tat: float
    paused_until: float
    penalty: float
    granted: int
    now: float


class _Skipped(Exception):
    """A reservation not tried: the database failed while it waited for the budget's thread."""


class _Sql:
    """The budget's statements for one dialect. `now` is the database's clock (seconds since
    the epoch) or, for tests on a virtual clock, a bound parameter."""

    def __init__(self, dialect: str, fixed_now: bool) -> None:
        pg = dialect == "postgresql"
        if fixed_now:
            now = "CAST(:now AS DOUBLE PRECISION)" if pg else "CAST(:now AS REAL)"
        elif pg:
            now = "extract(epoch FROM clock_timestamp())::float8"
        else:
            now = "((julianday('now') - 2440587.5) * 86400.0)"
        biggest, smallest = ("greatest", "least") if pg else ("max", "min")
        doubled = f"{smallest}(:max_pause, {biggest}(:min_pause, penalty * 2))"
        # PostgreSQL: the clock is read once in a sub-select (clock_timestamp() would move
        # between uses); SQLite: 'now' is the same for a whole statement.
        clock_from = f"FROM (SELECT {now} AS now) AS c " if pg else ""
        c_now = "c.now" if pg else now
        row = "tat, paused_until, penalty, granted"
        self.ensure = text(
            "INSERT INTO rate_budgets (provider, tat, paused_until, penalty, granted, "
            "rate_limited) VALUES (:provider, 0, 0, 0, 0, 0) ON CONFLICT (provider) DO NOTHING"
        )
        self.reserve = text(
            "UPDATE rate_budgets "  # noqa: S608 (every piece is a constant of this class)
            f"SET tat = {biggest}(tat, {c_now}, paused_until) + :interval, "
            f"granted = granted + 1 {clock_from}WHERE provider = :provider "
            f"RETURNING {row}, {c_now}"
        )
        self.rate_limited = text(
            "UPDATE rate_budgets SET "  # noqa: S608 (constants)
            f"penalty = CASE WHEN paused_until > {c_now} THEN penalty ELSE {doubled} END, "
            f"paused_until = CASE WHEN paused_until > {c_now} THEN paused_until "
            f"ELSE {c_now} + {doubled} END, "
            f"rate_limited = rate_limited + 1 {clock_from}WHERE provider = :provider "
            f"RETURNING {row}, {c_now}"
        )
        self.succeeded = text(
            "UPDATE rate_budgets SET penalty = 0 "  # noqa: S608 (constants)
            f"{clock_from}WHERE provider = :provider "
            f"AND penalty > 0 AND paused_until <= {c_now}"
        )


def budget_engine(url: str) -> Engine:
    """The budget's own engine: one connection, short timeouts; on PostgreSQL autocommit (one
    round trip per reservation) without waiting for the WAL flush."""
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "postgresql":
        ms = int(DB_TIMEOUT_SECONDS * 1000)
        return create_engine(
            url,
            hide_parameters=True,
            isolation_level="AUTOCOMMIT",
            pool_size=1,
            max_overflow=0,
            connect_args={
                "connect_timeout": max(1, int(DB_TIMEOUT_SECONDS)),
                "options": f"-c statement_timeout={ms} -c lock_timeout={ms} "
                "-c synchronous_commit=off",
            },
        )
    engine = make_engine(url)  # WAL, foreign keys, BEGIN IMMEDIATE: as the store's

    @event.listens_for(engine, "connect")
    def _short_wait(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(DB_TIMEOUT_SECONDS * 1000)}")
        finally:
            cursor.close()

    return engine


def shares_a_database(url: str) -> bool:
    """False for a database that other processes cannot reach (SQLite in memory)."""
    parsed = make_url(normalize_url(url))
    return parsed.get_backend_name() != "sqlite" or parsed.database not in (None, "", ":memory:")


class SharedRateBudget:
    """A :class:`keyturn.ports.RequestBudget` whose state is one row of ``rate_budgets``.

    `interval` and `burst` are the GCRA's (see :func:`keyturn.adapters.dfns.budget.spacing`);
    every process sharing the row should use the same. `fallback(share)` makes the in-process
    budget used while the database is unavailable, for `share` (0..1] of the rate. `clock` and
    `sleep` are the process's monotonic clock; `db_clock`, for tests only, replaces the
    database's clock."""

    def __init__(
        self,
        url: str,
        provider: str,
        *,
        interval: float,
        burst: int,
        fallback: Callable[[float], RequestBudget],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        db_clock: Callable[[], float] | None = None,
    ) -> None:
        if interval <= 0 or burst < 1:
            raise ValueError("a shared rate budget needs a positive interval and burst")
        self.url = normalize_url(url)
        self.provider = provider
        self.interval = interval
        self.burst = burst
        self.tolerance = (burst - 1) * interval
        self._make_fallback = fallback
        self._clock = clock
        self._sleep = sleep
        self._db_clock = db_clock
        self._sql = _Sql(make_url(self.url).get_backend_name(), fixed_now=db_clock is not None)
        self._engine: Engine | None = None
        self._row_ready = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"budget-{provider}")
        #: What this process knows of the row, on its monotonic clock.
        self._paused_until = 0.0
        self._penalty = 0.0
        #: Database availability: after a failure, not tried again before `_retry_at`.
        self._failures = 0
        self._retry_at = 0.0
        self._fallback: RequestBudget | None = None
        #: (monotonic time, reservations by this process, reservations by everyone).
        self._samples: deque[tuple[float, int, int]] = deque()
        self._reserved = 0
        self._share = 1.0
        #: Requests let through (shared or by the fallback), and 429s reported.
        self.granted = 0
        self.granted_locally = 0
        self.rate_limited = 0

    # ------------------------------------------------------------------------ the protocol

    async def acquire(self) -> None:
        while True:
            wait = await self._reserve()
            if wait is None:  # the database is unavailable: the in-process fallback decides
                if self._paused_until > self._clock():  # a pause this process knows of
                    await self._sleep(self._paused_until - self._clock())
                await self._local().acquire()
                self.granted += 1
                self.granted_locally += 1
                return
            if wait > 0:
                await self._sleep(wait)
            if self._clock() >= self._paused_until:
                self.granted += 1
                return
            # a pause began while this request waited for its slot: take one after the pause

    def rate_limited_now(self) -> None:
        self.rate_limited += 1
        now = self._clock()
        if self._fallback is not None:
            self._fallback.rate_limited_now()
        if now >= self._paused_until:  # pause this process at once; the row tells the others
            self._penalty = min(PAUSE_MAX_SECONDS, max(PAUSE_MIN_SECONDS, self._penalty * 2))
            self._paused_until = now + self._penalty
        if self._usable():
            params = self._params(min_pause=PAUSE_MIN_SECONDS, max_pause=PAUSE_MAX_SECONDS)
            self._report(self._sql.rate_limited, params)

    def succeeded(self) -> None:
        if self._fallback is not None:
            self._fallback.succeeded()
        if self._penalty > 0 and self._clock() >= self._paused_until:
            self._penalty = 0.0
            if self._usable():
                self._report(self._sql.succeeded, self._params())

    async def drain(self) -> None:
        """Wait until the reports made so far have reached the database (or failed)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, lambda: None)
        await asyncio.sleep(0)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._engine is not None:
            self._engine.dispose()

    # ------------------------------------------------------------------------ reservations

    def _usable(self) -> bool:
        return self._clock() >= self._retry_at

    async def _reserve(self) -> float | None:
        """Reserve the next slot in the row: the seconds to wait for it, or None when the
        database cannot be used now."""
        if not self._usable():
            return None
        loop = asyncio.get_running_loop()
        try:
            slot = await loop.run_in_executor(
                self._executor, self._reserve_sync, self._params(interval=self.interval)
            )
        except _Skipped:
            return None
        except SQLAlchemyError as exc:
            self._unavailable(exc)
            return None
        received = self._clock()
        self._available()
        self._learn(slot, received)
        self._reserved += 1
        self._sample(received, slot.granted)
        start = max(slot.now, slot.tat - self.interval - self.tolerance, slot.paused_until)
        return start - slot.now

    def _learn(self, slot: _Slot, received: float) -> None:
        """Take the row's pause into this process's clock."""
        self._penalty = slot.penalty
        if slot.paused_until > slot.now:
            self._paused_until = max(self._paused_until, received + slot.paused_until - slot.now)

    def _params(self, **more: Any) -> dict[str, Any]:
        params: dict[str, Any] = {"provider": self.provider, **more}
        if self._db_clock is not None:
            params["now"] = self._db_clock()
        return params

    def _connect(self) -> Engine:
        if self._engine is None:
            self._engine = budget_engine(self.url)
        return self._engine

    def _run(self, statement: Any, params: dict[str, Any]) -> _Slot | None:
        """Run an UPDATE of the row (created first if needed); the row it returns. A pooled
        connection the server closed (a restart since the last request) is replaced once."""
        try:
            return self._run_once(statement, params)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            return self._run_once(statement, params)

    def _run_once(self, statement: Any, params: dict[str, Any]) -> _Slot | None:
        engine = self._connect()
        with engine.begin() as conn:
            if not self._row_ready:
                conn.execute(self._sql.ensure, {"provider": self.provider})
            result = conn.execute(statement, params)
            row = result.fetchone() if result.returns_rows else None
        self._row_ready = True
        if row is None:
            return None
        return _Slot(float(row[0]), float(row[1]), float(row[2]), int(row[3]), float(row[4]))

    def _reserve_sync(self, params: dict[str, Any]) -> _Slot:
        if not self._usable():  # it failed while this waited its turn: do not wait again
            raise _Skipped
        slot = self._run(self._sql.reserve, params)
        if slot is None:  # the row was deleted under us: make it again
            self._row_ready = False
            slot = self._run(self._sql.reserve, params)
        if slot is None:  # pragma: no cover - the row was just made
            raise RuntimeError("the rate_budgets row vanished twice")
        return slot

    def _report(self, statement: Any, params: dict[str, Any]) -> None:
        """Write a 429 or a success to the row without making the caller wait for it."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._run, statement, params)

        def done(f: asyncio.Future[_Slot | None]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            if isinstance(exc, SQLAlchemyError):
                self._unavailable(exc)
            elif exc is not None:
                log.error("request budget: report failed", provider=self.provider, error=repr(exc))
            elif (slot := f.result()) is not None:
                self._learn(slot, self._clock())

        future.add_done_callback(done)

    # ------------------------------------------------------------------------ the fallback

    def _sample(self, now: float, granted: int) -> None:
        """Track this process's share of everyone's reservations over the last minute."""
        if self._samples and now - self._samples[-1][0] < 1.0:
            return
        self._samples.append((now, self._reserved, granted))
        while len(self._samples) > 2 and now - self._samples[1][0] >= SHARE_WINDOW_SECONDS:
            self._samples.popleft()
        first, last = self._samples[0], self._samples[-1]
        everyone = last[2] - first[2]
        if everyone >= 20:
            self._share = min(1.0, max(MIN_SHARE, (last[1] - first[1]) / everyone))

    @property
    def share(self) -> float:
        """This process's recent share of the budget (the fallback's rate)."""
        return self._share

    def _local(self) -> RequestBudget:
        if self._fallback is None:
            self._fallback = self._make_fallback(self._share)
        return self._fallback

    def _unavailable(self, exc: SQLAlchemyError) -> None:
        if not self._usable():  # a failure of a statement sent before the last one failed
            return
        self._failures += 1
        delay = min(RETRY_MAX_SECONDS, RETRY_MIN_SECONDS * 2 ** (self._failures - 1))
        self._retry_at = self._clock() + delay
        self._row_ready = False
        if self._failures == 1:
            orig = getattr(exc, "orig", None) or exc
            first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
            log.warning(
                "request budget: database unavailable; this process uses a local budget",
                provider=self.provider,
                share=round(self._share, 3),
                error=f"{type(orig).__name__}: {first}"[:300],
                retry_in=delay,
            )

    def _available(self) -> None:
        if self._failures:
            log.info("request budget: database available again", provider=self.provider)
        self._failures = 0
        self._fallback = None

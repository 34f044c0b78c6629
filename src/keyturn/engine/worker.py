"""The worker: claims due rotations with a lease and advances many of them at once."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import structlog

from keyturn.domain.errors import KeyturnError, StaleVersion, StoreUnavailable
from keyturn.domain.lifecycle import FORWARD, Trigger
from keyturn.domain.model import Event, Rotation, WorkerRecord
from keyturn.engine.batch import CommitBatcher, Loaders
from keyturn.engine.gates import before_step
from keyturn.engine.notify import Deliverer
from keyturn.engine.operator import (
    APPROVAL_KEY,
    apply_request,
    halt_advice,
    halt_advice_plain,
)
from keyturn.engine.run import (
    EngineDeps,
    LeaseLost,
    OperatorInterrupt,
    RotationRun,
    WorkerStopping,
    db,
    engine_logger,
)
from keyturn.engine.scheduler import Scheduler
from keyturn.engine.steps import WaitExpired, Waiting, run_step

log = structlog.get_logger("keyturn.worker")

#: A worker row silent for longer than this is deleted (by any worker, every purge round).
WORKER_RETENTION = timedelta(days=1)
#: How often a worker re-samples the schedule's clock (a shared test clock set after it
#: started, or the database's drift; the scheduler also does at each tick).
CLOCK_SYNC_SECONDS = 5.0


class LeaseGivenBack(WorkerStopping):
    """The holder honoured a release-lease: leave the rotation at this action boundary."""


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        deps: EngineDeps,
        *,
        concurrency: int = 8,
        owner: str | None = None,
        notifier: Deliverer | None = None,
    ) -> None:
        if concurrency < 1:
            raise KeyturnError("--concurrency must be at least 1")
        self.deps = deps
        self.concurrency = concurrency
        self.owner = owner or default_owner()
        self._stopping = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()
        self.batcher: CommitBatcher | None = None
        self.loaders: Loaders | None = None
        self._engine_log: Any = None
        self.completed = 0
        #: Rotations this worker halted for a human (its --until-idle exit code says so).
        self.halted: set[str] = set()
        self.started_at: datetime | None = None
        self._registered = False
        #: Fires the due slots of the configured policies (None: nothing scheduled here).
        self.scheduler = (
            Scheduler(deps, owner=self.owner)
            if deps.schedule is not None and deps.slots is not None and deps.schedule.policies
            else None
        )
        #: Delivers the notification outbox in a task of its own (None: no sinks configured).
        self.notifier = notifier

    def stop(self) -> None:
        """Stop claiming; in-flight rotations stop at their next action boundary."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self, *, until_idle: bool = False) -> None:
        self.batcher = CommitBatcher(self.deps.store)
        self.loaders = Loaders.of(self.deps.store)
        self._engine_log = engine_logger()
        await self._register()
        heartbeat = asyncio.create_task(self._heartbeat(), name=f"heartbeat {self.owner}")
        ticking = (
            asyncio.create_task(self.scheduler.run(self._stopping), name=f"scheduler {self.owner}")
            if self.scheduler is not None and not until_idle
            else None
        )
        # wait deadlines and reminders follow the schedule's clock
        following = asyncio.create_task(self._follow_clock(), name=f"clock {self.owner}")
        notifying = (
            asyncio.create_task(self.notifier.run(self._stopping), name=f"notify {self.owner}")
            if self.notifier is not None
            else None
        )
        clean = False
        try:
            await self._run(until_idle=until_idle)
            clean = True
        finally:
            heartbeat.cancel()
            following.cancel()
            if ticking is not None:
                ticking.cancel()
            if notifying is not None and self.notifier is not None:
                notifying.cancel()
                if until_idle:  # what this run caused is sent before it exits (bounded)
                    await self.notifier.drain(self.notifier.settings.timeout_seconds)
            await self.batcher.aclose()
            await self.loaders.aclose()
            log.info(
                "commits",
                owner=self.owner,
                batches=self.batcher.batches,
                changes=self.batcher.requests,
            )
            if clean:
                await self._stopped()

    # ------------------------------------------------------------------ liveness

    @property
    def heartbeat_seconds(self) -> float:
        return self.deps.settings.lease_seconds / 3

    async def _register(self) -> None:
        """Record this worker's start (never fatal: the heartbeat registers it later)."""
        now = self.deps.clock.now()
        if self.started_at is None:
            self.started_at = now
        record = WorkerRecord(
            owner=self.owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self.started_at,
            heartbeat_at=now,
            concurrency=self.concurrency,
            heartbeat_seconds=self.heartbeat_seconds,
            lease_seconds=self.deps.settings.lease_seconds,
        )
        try:
            await db(self.deps.store.register_worker, record)
        except KeyturnError as exc:
            log.warning("could not register the worker; will retry", error=str(exc))
            return
        self._registered = True

    async def _heartbeat(self) -> None:
        """One UPDATE every heartbeat interval (a third of the lease), so `keyturn workers`
        and `rotations show` can tell a live holder from a dead one."""
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            if not self._registered:
                await self._register()
                continue
            try:
                found = await db(
                    self.deps.store.heartbeat_worker, self.owner, self.deps.clock.now()
                )
            except KeyturnError as exc:
                log.warning("heartbeat failed; will retry", error=str(exc))
                continue
            if not found:  # pruned while cut off from the database, say: register again
                self._registered = False
                await self._register()

    async def _follow_clock(self) -> None:
        """Re-sample the schedule's clock every few seconds (without it, a worker that runs no
        scheduler never saw a shared test clock set after it started). When the shared test
        clock was set, every waiting rotation is checked again at once: its next check was
        converted to this worker's clock under the previous setting."""
        seen = self.deps.time.anchor
        while True:
            await asyncio.sleep(CLOCK_SYNC_SECONDS)
            try:
                await db(self.deps.time.sync)
                if self.deps.time.anchor != seen:
                    woken = await db(self.deps.store.wake_waiting, self.deps.clock.now())
                    log.info("the schedule's clock was set; waiting rotations due now", woken=woken)
                seen = self.deps.time.anchor
            except KeyturnError as exc:
                log.warning("could not sample the schedule's clock; will retry", error=str(exc))

    async def _stopped(self) -> None:
        try:
            await db(self.deps.store.stop_worker, self.owner, self.deps.clock.now())
        except KeyturnError as exc:
            log.warning("could not record the worker's stop", error=str(exc))

    async def _run(self, *, until_idle: bool) -> None:
        settings = self.deps.settings
        log.info("worker started", owner=self.owner, concurrency=self.concurrency)
        purge_every = 300.0
        loop = asyncio.get_running_loop()
        last_purge = loop.time() - purge_every  # purge expired keys at start
        outage = 0
        while not self.stopping:
            try:
                if loop.time() - last_purge > purge_every:
                    await self._purge()
                    last_purge = loop.time()
                claimed, free = await self._claim()
                if until_idle and not claimed and not self._inflight and not await self._waiting():
                    break
            except StoreUnavailable as exc:
                outage += 1
                delay = min(10.0, 0.5 * 2 ** min(outage, 5))
                log.warning("database unavailable; backing off", error=str(exc), retry_in=delay)
                await self._sleep(delay)
                continue
            outage = 0
            if not claimed or free <= len(claimed):
                await self._sleep(settings.poll_seconds if not claimed else 0.05)
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        log.info("worker stopped", owner=self.owner, completed=self.completed)

    async def _claim(self) -> tuple[list[Rotation], int]:
        """Lease as many due rotations as there are free slots and start driving them."""
        free = self.concurrency - len(self._inflight)
        if free <= 0:
            return [], free
        claimed_at = time.monotonic()
        now = self.deps.clock.now()
        claimed = await db(
            self.deps.store.claim,
            owner=self.owner,
            now=now,
            lease_until=now + timedelta(seconds=self.deps.settings.lease_seconds),
            limit=free,
        )
        for rotation in claimed:
            task = asyncio.create_task(self._drive(rotation, claimed_at), name=rotation.id)
            self._inflight[rotation.id] = task
            task.add_done_callback(self._forget)
        return claimed, free

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task.get_name(), None)
        self._slot_freed.set()  # a full worker claims again at once, not after a poll

    async def _sleep(self, seconds: float) -> None:
        """Sleep until `seconds` pass, the worker is stopped, or a slot frees up."""
        self._slot_freed.clear()
        stop = asyncio.ensure_future(self._stopping.wait())
        freed = asyncio.ensure_future(self._slot_freed.wait())
        try:
            await asyncio.wait({stop, freed}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            freed.cancel()

    async def _waiting(self) -> bool:
        """Is any unfinished rotation running elsewhere or scheduled to run again soon?"""
        horizon = self.deps.clock.now() + timedelta(seconds=self.deps.settings.retry.max_seconds)
        return await db(self.deps.store.has_pending_work, horizon)

    async def _purge(self) -> None:
        now = self.deps.clock.now()
        purged = await db(self.deps.store.purge_secrets, now)
        if purged:
            log.info("purged retained keys", count=len(purged))
        pruned = await db(self.deps.store.prune_workers, now - WORKER_RETENTION)
        if pruned:
            log.info("pruned silent workers", count=pruned)

    # ------------------------------------------------------------------ one rotation

    async def _drive(self, rotation: Rotation, claimed_at: float) -> None:
        run = RotationRun(
            self.deps,
            rotation,
            self.owner,
            leased_at=claimed_at,
            logger=self._engine_log,
            batcher=self.batcher,
            loaders=self.loaders,
            # every run ends with a write (the release, a failure, a halt), so writes are held
            hold_writes=True,
            stopping=self._stopping,
            # its steps follow one another at once: one provider session for all of them
            keep_sessions=True,
        )
        renewer = asyncio.create_task(self._renew(run))
        try:
            await self._note_takeover(run)
            await self._advance(run)
        except (StaleVersion, LeaseLost) as exc:
            run.log.warning("lease lost; abandoning the rotation to its new holder", error=str(exc))
            return
        except StoreUnavailable as exc:
            # The last write may or may not have landed: leave the rotation; when the lease
            # expires it is claimed again and resumes from what the database holds.
            run.log.warning(
                "database unavailable; leaving the rotation to a later claim", error=str(exc)
            )
            return
        except WorkerStopping:
            run.log.info("stopping at an action boundary")
        except Exception as exc:  # a bug: halt the rotation for a human, keep the worker alive
            run.log.exception("internal error")
            await self._halt_quietly(run, f"internal error ({type(exc).__name__}): {exc}")
            return
        finally:
            renewer.cancel()
            await run.close_sessions()
        await run.release()
        await self._wake_on_new_evidence(run)
        if self.scheduler is not None and run.rotation.finished:
            # the credential's next slot, from the key the release just recorded
            await self.scheduler.finished(run.rotation.credential)

    async def _wake_on_new_evidence(self, run: RotationRun) -> None:
        """Evidence recorded while this run held the lease (a person's page, just after the
        step read it) did not make the rotation due, and the wait this run wrote set its next
        check later: read it again after the release, and make the rotation due now when a new
        name came meanwhile (later evidence finds it unleased and wakes it itself)."""
        seen, rotation = run.evidence_seen, run.rotation
        if seen is None or rotation.finished or rotation.wait_key is None:
            return
        try:
            found = await db(self.deps.store.evidence, rotation.id)
            if set(found) - seen:
                await db(self.deps.store.wake_waiting, self.deps.clock.now(), rotation.id)
        except StoreUnavailable as exc:  # its next check comes anyway, later
            run.log.warning("could not look for evidence after the release", error=str(exc))

    async def _note_takeover(self, run: RotationRun) -> None:
        """A claim that took over another owner's expired lease goes in the timeline, with
        when that holder last heartbeat; held, so it is written with the first write after
        the claim (no extra commit)."""
        rotation = run.rotation
        previous = rotation.lease_taken_from
        if previous is None or previous == self.owner:
            return
        try:
            holder = (await db(self.deps.store.get_workers, [previous])).get(previous)
        except KeyturnError:
            holder = None
        last_seen = holder.heartbeat_at.isoformat() if holder is not None else None
        seen = (
            f"last heartbeat {holder.heartbeat_at.strftime('%Y-%m-%d %H:%M:%S UTC')}"
            if holder is not None
            else "no worker registered under that owner"
        )
        event = Event(
            rotation_id=rotation.id,
            at=self.deps.clock.now(),
            kind="run",
            actor=self.owner,
            trigger="claim",
            from_state=rotation.state.value,
            reason=f"lease of {previous} expired ({seen})",
            detail={"status": "taken_over", "from": previous, "holder_last_seen": last_seen},
        )
        run.log.info("took over an expired lease", previous_owner=previous, last_seen=last_seen)
        await run.unit.add(events=[event])

    async def _advance(self, run: RotationRun) -> None:
        while True:
            rotation = run.rotation
            if rotation.request is not None:
                await self._carry_out_request(run)
                continue
            if rotation.finished:
                await self._finished(rotation)
                return
            if rotation.paused or rotation.halted_reason:
                return
            now = self.deps.clock.now()
            if rotation.next_attempt_at is not None and rotation.next_attempt_at > now:
                return
            if self.stopping:
                raise WorkerStopping()
            if not await self._attempt(run, FORWARD[rotation.state]):
                return

    async def _attempt(self, run: RotationRun, trigger: Trigger) -> bool:
        """One attempt at the step of `trigger`: True when the rotation goes on at once (the
        step's transition was made, or an operator request came first). Counted by result
        and timed when the process has metrics."""
        result = "error"  # an exception that is not keyturn's: a bug, halted by _drive
        started = time.perf_counter()
        elapsed = 0.0
        try:
            try:
                await before_step(run, trigger)
                await run_step(run, trigger)
            finally:
                elapsed = time.perf_counter() - started
            result = "ok"
            return True
        except OperatorInterrupt:
            result = "interrupted"
            return True
        except Waiting as wait:
            result = "waiting"
            await self._wait(run, trigger.value, wait)
            return False
        except (StaleVersion, LeaseLost):
            result = "lease_lost"
            raise
        except WorkerStopping:
            result = "stopped"
            raise
        except StoreUnavailable:
            result = "store_unavailable"
            raise
        except WaitExpired as exc:
            result = "halted"
            await self._halt(run, trigger.value, str(exc), retryable=False, person=exc.person)
            return False
        except KeyturnError as exc:
            result = await self._failed(run, trigger.value, exc)
            return False
        finally:
            if self.deps.metrics is not None:
                self.deps.metrics.step(trigger.value, result, elapsed)

    async def _carry_out_request(self, run: RotationRun) -> None:
        """Apply the pending operator request; LeaseGivenBack for a release-lease its holder
        honours (the release that follows gives the lease back)."""
        applied = await apply_request(run)
        run.log.info("operator request", action=applied.action.value, outcome=applied.outcome)
        if applied.release:
            raise LeaseGivenBack()

    async def _finished(self, rotation: Rotation) -> None:
        self.completed += 1

    async def _wait(self, run: RotationRun, step: str, wait: Waiting) -> None:
        """Record what the step waits for (an event when the wait begins or changes); the
        release that follows gives back the lease and the slot. Not an attempt."""
        rotation = run.rotation
        events = []
        changed = rotation.wait_key != wait.key or rotation.wait_for != wait.what
        if changed and wait.announce:
            events.append(
                Event(
                    rotation_id=rotation.id,
                    at=self.deps.clock.now(),
                    kind="run",
                    actor=self.owner,
                    trigger=step,
                    from_state=rotation.state.value,
                    reason=wait.what,
                    detail={
                        # an approval wait is an event a notification can be sent for
                        "status": "awaiting_approval"
                        if wait.key.startswith(APPROVAL_KEY)
                        else "waiting",
                        "wait": wait.key,
                        "deadline": wait.deadline.isoformat(),
                    },
                )
            )
        await run.unit.add(updates=wait.updates(), events=events)

    async def _halt(
        self,
        run: RotationRun,
        step: str,
        message: str,
        *,
        retryable: bool,
        person: str | None = None,
    ) -> None:
        rotation = run.rotation
        now = self.deps.clock.now()
        reason = f"step {step}: {message}. {await self._advice(rotation, person)}"
        event = Event(
            rotation_id=rotation.id,
            at=now,
            kind="run",
            actor=self.owner,
            trigger=step,
            from_state=rotation.state.value,
            reason=message,
            detail={"status": "halted", "attempt": rotation.attempts, "retryable": retryable},
        )
        run.log.warning("step halted", step=step, error=message)
        self.halted.add(rotation.id)
        # held: the release that follows writes it, so the halt and the lease's end are one commit
        await run.unit.add(updates={"halted_reason": reason}, events=[event])

    async def _advice(self, rotation: Rotation, person: str | None = None) -> str:
        try:
            return await db(
                halt_advice, self.deps.store, self.deps.registry, rotation, person=person
            )
        except KeyturnError:  # the store is away: the plain advice
            return halt_advice_plain(rotation, person)

    async def _failed(self, run: RotationRun, step: str, exc: KeyturnError) -> str:
        """Record a failed attempt: "retry" (backing off) or "halted" (for a human)."""
        rotation = run.rotation
        policy = self.deps.settings.retry
        attempts = rotation.attempts + 1
        retryable = bool(getattr(exc, "retryable", False))
        now = self.deps.clock.now()
        message = str(exc)
        updates: dict[str, Any] = {"attempts": attempts, "last_error": message}
        if retryable and not policy.exhausted(attempts):
            delay = policy.delay(attempts)
            updates["next_attempt_at"] = now + timedelta(seconds=delay)
            status = f"retry {attempts}/{policy.max_attempts} in {delay:.1f}s"
        else:
            why = (
                f"step {step} failed {attempts} times (retry budget spent)"
                if retryable
                else f"step {step} failed and is not safe to retry"
            )
            updates["halted_reason"] = f"{why}: {message}. {await self._advice(rotation)}"
            status = "halted"
            self.halted.add(rotation.id)
        event = Event(
            rotation_id=rotation.id,
            at=now,
            kind="run",
            actor=self.owner,
            trigger=step,
            from_state=rotation.state.value,
            reason=message,
            detail={"status": status, "attempt": attempts, "retryable": retryable},
        )
        run.log.warning("step failed", step=step, status=status, error=message)
        # held: the release that follows writes it with the lease's end, in one commit
        await run.unit.add(updates=updates, events=[event])
        return "halted" if status == "halted" else "retry"

    async def _halt_quietly(self, run: RotationRun, reason: str) -> None:
        rotation = run.rotation
        event = Event(
            rotation_id=rotation.id,
            at=self.deps.clock.now(),
            kind="run",
            actor=self.owner,
            trigger="internal",
            from_state=rotation.state.value,
            reason=reason,
            detail={"status": "halted", "attempt": rotation.attempts, "retryable": False},
        )
        try:
            await run.unit.write(
                updates={"halted_reason": reason, "lease_owner": None, "lease_expires_at": None},
                events=[event],
            )
        except KeyturnError:
            run.log.warning("could not record the halt")

    async def _renew(self, run: RotationRun) -> None:
        interval = self.deps.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await run.renew()
            except (StaleVersion, LeaseLost):
                return
            except KeyturnError:
                run.log.warning("lease renewal failed; will retry")

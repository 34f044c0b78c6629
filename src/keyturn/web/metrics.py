"""``GET /metrics`` of `keyturn serve`: Prometheus text format.

The fleet-wide facts are read from the store at scrape time (:class:`FleetCollector`, through
the :class:`~keyturn.ports.FleetReader` port), so they are right whatever process did the work,
and every counter moves exactly as the event log says. The process's own counters (step
attempts and durations, provider requests; see keyturn.adapters.metrics) come with them when
serve runs a worker. Labels are bounded: states, statuses, kinds, steps, verbs, credential
names and worker owners, never a rotation id or an error's text.

``[serve] metrics`` says who may read it: ``token`` (default: a viewer token or above),
``open`` (anyone who can reach the port) or ``off`` (no route: 404).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from keyturn.domain.errors import KeyturnError
from keyturn.domain.lifecycle import FINAL_STATES, State
from keyturn.engine.attention import STATUSES
from keyturn.engine.fleet import attention_summary, by_state_and_status
from keyturn.ports import Clock, FleetReader

#: Who may read /metrics (``[serve] metrics``).
MODES = ("token", "open", "off")
#: The classic text format (what generate_latest writes for names like keyturn's), which
#: every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _campaigns(progress: dict[str, dict[str, int]]) -> Metric:
    family = GaugeMetricFamily(
        "keyturn_campaign_rotations",
        "A campaign's rotations by where each is, in its kind's words (invited, done, overdue, "
        "...; every label of the campaign present, 0 when none).",
        labels=["campaign", "progress"],
    )
    for campaign, by_label in progress.items():
        for label, n in by_label.items():
            family.add_metric([campaign, label], n)
    return family


class FleetCollector:
    """The installation's metrics, read from the store at each scrape (prometheus-client's
    custom collector protocol: ``collect()`` yields metric families)."""

    def __init__(
        self,
        reader: FleetReader,
        clock: Clock,
        campaigns: Callable[[datetime], dict[str, dict[str, int]]] | None = None,
    ) -> None:
        self.reader = reader
        self.clock = clock
        #: {campaign: {progress label: count}} at a time (keyturn.engine.campaigns.progress)
        self.campaigns = campaigns

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        now = self.clock.now()
        up = GaugeMetricFamily(
            "keyturn_store_up", "1 when the store answered this scrape's reads, else 0."
        )
        try:
            facts = self.reader.fleet_facts(now)
        except KeyturnError:  # the store is away: say so, and serve what this process knows
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        rotations = GaugeMetricFamily(
            "keyturn_rotations",
            "Rotations in the store by state and status (every state and status is present, "
            "0 when none).",
            labels=["state", "status"],
        )
        counts = by_state_and_status(facts.rotations)
        statuses = [*STATUSES, *sorted({s for _, s in counts} - set(STATUSES))]
        for state in State:
            for status in statuses:
                n = counts.get((state.value, status), 0)
                if n or _possible(state, status):
                    rotations.add_metric([state.value, status], n)
        yield rotations

        transitions = CounterMetricFamily(
            "keyturn_transitions",
            "Transitions recorded in the event log, by source and destination state and the "
            "rotation's kind.",
            labels=["from", "to", "kind"],
        )
        for (source, dest, kind), n in sorted(facts.transitions.items()):
            transitions.add_metric([source, dest, kind], n)
        yield transitions

        actions = CounterMetricFamily(
            "keyturn_operator_actions",
            "Operator actions recorded in the event log, by verb (create is a rotation "
            "started) and outcome (applied, requested, refused).",
            labels=["verb", "outcome"],
        )
        for (verb, outcome), n in sorted(facts.operator_actions.items()):
            actions.add_metric([verb, outcome], n)
        yield actions

        if self.campaigns is not None:
            yield _campaigns(self.campaigns(now))

        yield from _per_credential(
            "keyturn_credential_key_created_timestamp_seconds",
            "When the credential's current key was recorded (Unix time).",
            facts.keys_created,
        )
        yield from _per_credential(
            "keyturn_credential_next_rotation_timestamp_seconds",
            "When the credential's scheduled rotation is due (Unix time; absent when none is "
            "scheduled).",
            facts.next_rotations,
        )
        yield from _per_credential(
            "keyturn_rotation_last_success_timestamp_seconds",
            "When the credential's latest successful rotation (old_deactivated) finished "
            "(Unix time).",
            facts.last_successes,
        )

        summary = attention_summary(facts.attention_candidates, now)
        yield GaugeMetricFamily(
            "keyturn_attention_rotations",
            "Rotations that need a human now (as `rotations list --attention`).",
            value=summary.count,
        )
        yield GaugeMetricFamily(
            "keyturn_attention_oldest_age_seconds",
            "Seconds since the longest-standing rotation that needs attention started needing "
            "it (0 when none does).",
            value=round(summary.oldest_age_seconds, 3),
        )

        beats = GaugeMetricFamily(
            "keyturn_worker_last_heartbeat_timestamp_seconds",
            "The last heartbeat of each worker that has not stopped cleanly (Unix time); a "
            "killed worker stays until its row is pruned (a day of silence).",
            labels=["worker"],
        )
        by_status = {"live": 0, "stale": 0, "stopped": 0}
        for w in facts.workers:
            status = w.status(now)
            by_status[status] = by_status.get(status, 0) + 1
            if status != "stopped":
                beats.add_metric([w.owner], w.heartbeat_at.timestamp())
        yield beats
        workers = GaugeMetricFamily(
            "keyturn_workers",
            "Registered workers by liveness (live, stale: no heartbeat for two intervals, "
            "stopped).",
            labels=["status"],
        )
        for status, n in sorted(by_status.items()):
            workers.add_metric([status], n)
        yield workers

        yield GaugeMetricFamily(
            "keyturn_store_read_seconds",
            "How long this scrape's reads of the store took.",
            value=round(time.perf_counter() - started, 6),
        )


def _possible(state: State, status: str) -> bool:
    """The (state, status) series always present (0 when empty), so a rate or an absence
    alert has a series to look at: a final state is done, an unfinished one anything else."""
    return (status == "done") == (state in FINAL_STATES)


def _per_credential(name: str, doc: str, values: dict[str, float]) -> Iterator[Metric]:
    family = GaugeMetricFamily(name, doc, labels=["credential"])
    for credential, at in sorted(values.items()):
        family.add_metric([credential], round(at, 3))
    yield family


class _Together:
    """Several collectors as one (what generate_latest reads)."""

    def __init__(self, collectors: Iterable[Any]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for c in self.collectors:
            yield from c.collect()


def scraper(collectors: Iterable[Any]) -> Callable[[], bytes]:
    """The /metrics body: every collector's families in the text format (blocking)."""
    together = _Together(collectors)
    return lambda: generate_latest(together)


def mount(app: FastAPI, mode: str, scrape: Callable[[], bytes], viewer: Any) -> None:
    """Add ``GET /metrics`` (outside the OpenAPI document: it is not JSON) as `mode` says;
    `viewer` is the dependency that requires a viewer token."""
    if mode == "off":
        return

    async def metrics() -> Response:
        body = await asyncio.to_thread(scrape)
        return Response(body, headers={"Content-Type": CONTENT_TYPE})

    app.get(
        "/metrics",
        include_in_schema=False,
        dependencies=[viewer] if mode == "token" else [],
    )(metrics)

"""Notifications in isolation: which events notify (keyturn.domain.notify), the sinks' request
shapes, signatures and redaction (httpx.MockTransport), sink secrets from the environment or a
0600 file, and the delivery loop's retry decisions on a real SQLite outbox."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyturn.adapters import sinks
from keyturn.adapters.store.outbox import SqlOutbox
from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.errors import ConfigError
from keyturn.domain.lifecycle import State
from keyturn.domain.model import Event, ManagedCredential, Rotation
from keyturn.domain.notify import NoticeKind, notice_for, notices
from keyturn.engine.notify import Deliverer, DeliverySettings, routes
from keyturn.ports import Change

T0 = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
HALTED = "step verify failed 8 times: HTTP 503. Fix it, then resume"
ROT = Rotation(
    "rot_1", "payments", "service_account", State.NEW_ADDED, 3, "test", T0, T0,
    halted_reason=HALTED,
)  # fmt: skip


def _run(status: str, **detail: Any) -> Event:
    return Event("rot_1", T0, "run", "w1", trigger="verify", from_state="new_added",
                 reason="HTTP 503", detail={"status": status, **detail})  # fmt: skip


def test_which_events_notify() -> None:
    transition = Event("rot_1", T0, "transition", "w1", from_state="verified",
                       to_state="old_deactivated", trigger="deactivate_old")  # fmt: skip
    rolled = Event("rot_1", T0, "transition", "w1", to_state="rolled_back")
    found = notices(
        [
            _run("halted", attempt=8),
            _run("retry 2/8 in 1.0s"),
            _run("awaiting_approval", wait="gate.approval.before_start"),
            _run("waiting"),
            _run("taken_over"),
            Event("rot_1", T0, "operator", "alice", trigger="resume", detail={"status": "applied"}),
            Event("rot_1", T0, "action", "w1"),
            transition,
            rolled,
        ],
        ROT,
    )
    assert [n.kind for n in found] == [
        NoticeKind.HALTED,
        NoticeKind.AWAITING_APPROVAL,
        NoticeKind.WAITING,
        NoticeKind.COMPLETED,
        NoticeKind.ROLLED_BACK,
    ]
    halted = found[0]
    assert halted.reason == ROT.halted_reason  # the error and what to do about it
    assert halted.opens and not halted.resolves and found[3].resolves
    assert "rot_1" in halted.summary and "payments" in halted.summary
    assert halted.payload()["detail"] == {"attempt": 8}
    assert found[3].state == "old_deactivated"
    assert json.loads(json.dumps(halted.payload()))["kind"] == "halted"


def test_lost_holder_notice_carries_its_key() -> None:
    notice = notice_for(_run("holder_lost", **{"from": "w-dead"}), ROT, key="k1")
    assert notice is not None and notice.kind is NoticeKind.HOLDER_LOST and notice.key == "k1"


def test_sink_secret_from_env_or_a_0600_file(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("KT_SINK", " s3cret ")
    assert sinks.read_secret("KT_SINK", None, "key x.secret_env") == "s3cret"
    monkeypatch.delenv("KT_SINK")
    with pytest.raises(ConfigError, match=r"key x.secret_env: environment variable KT_SINK"):
        sinks.read_secret("KT_SINK", None, "key x.secret_env")
    f = tmp_path / "k"
    f.write_text("filesecret\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match=r"mode 0644, readable by others; run chmod 600"):
        sinks.read_secret(None, f, "key x.secret_file")
    f.chmod(0o600)
    assert sinks.read_secret(None, f, "key x.secret_file") == "filesecret"
    with pytest.raises(ConfigError, match="cannot be read"):
        sinks.read_secret(None, tmp_path / "missing", "key x.secret_file")


def _transport(handler: Any) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


NOTE = {**notice_for(_run("halted"), ROT).payload(), "id": 7}  # type: ignore[union-attr]
DONE = {**NOTE, "kind": "completed", "opens": False, "resolves": True, "id": 8}


def test_sinks_redact_their_secrets_from_errors() -> None:
    url = "https://hooks.slack.com/services/T0/B0/supersecretpath"

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot connect to {request.url}")

    slack = sinks.SlackSink("chat", ["halted"], url=url, transport=_transport(refuse))
    result = asyncio.run(slack.send(NOTE))
    assert not result.ok and result.retryable and result.error
    assert "supersecretpath" not in result.error and sinks.REDACTED in result.error

    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, text=f"bad key {json.loads(request.content)['routing_key']}")

    pd = sinks.PagerDutySink(
        "pd", ["halted"], routing_key="R0UTINGKEY123", events_url="http://pd.test/v2/enqueue",
        transport=_transport(echo),
    )  # fmt: skip
    result = asyncio.run(pd.send(NOTE))
    assert result.status_code == 400 and not result.retryable
    assert result.error == f"HTTP 400: bad key {sinks.REDACTED}"


def test_request_shapes_and_the_webhook_signature() -> None:
    seen: list[httpx.Request] = []

    def ok(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202 if "pd" in str(request.url) else 200)

    t = _transport(ok)
    hook = sinks.WebhookSink("hook", ["halted"], url="http://hook.test/in", key="k3y", transport=t)
    am = sinks.AlertmanagerSink("am", ["halted"], url="http://am.test:9093/", transport=t,
                                labels={"severity": "page"})  # fmt: skip
    pd = sinks.PagerDutySink("pd", ["halted"], routing_key="rk", events_url="http://pd.test/e",
                             transport=t)  # fmt: skip
    for sink in (hook, am, pd):
        assert asyncio.run(sink.send(NOTE)).ok
        assert asyncio.run(sink.send(DONE)).ok
    hook_req, _, am_fire, am_end, pd_fire, pd_end = seen
    header = hook_req.headers[sinks.SIGNATURE_HEADER]
    now = int(header.split(",")[0].removeprefix("t="))
    assert sinks.verify("k3y", hook_req.content, header, now=now)
    assert not sinks.verify("k3y", hook_req.content + b" ", header, now=now)
    assert not sinks.verify("other", hook_req.content, header, now=now)
    assert not sinks.verify("k3y", hook_req.content, header, now=now + 3600)  # a replay
    assert hook_req.headers[sinks.NOTIFICATION_ID_HEADER] == "7"
    assert json.loads(hook_req.content)["type"] == "keyturn.notification"
    assert str(am_fire.url) == "http://am.test:9093/api/v2/alerts"
    (fire,), (end,) = json.loads(am_fire.content), json.loads(am_end.content)
    assert "endsAt" not in fire and fire["labels"]["severity"] == "page"
    assert fire["labels"]["rotation"] == "rot_1" and end["labels"] == fire["labels"]
    assert end["endsAt"] == DONE["at"]
    trigger, resolve = json.loads(pd_fire.content), json.loads(pd_end.content)
    assert trigger["event_action"] == "trigger" and resolve["event_action"] == "resolve"
    assert trigger["dedup_key"] == resolve["dedup_key"] == "keyturn-rot_1"
    assert trigger["payload"]["severity"] == "critical" and "payload" not in resolve


def test_routing_sends_the_end_to_paging_sinks_that_opened_something() -> None:
    def t(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200)

    chat = sinks.SlackSink("chat", ["halted"], url="http://s.test/x", transport=_transport(t))
    pd = sinks.PagerDutySink("pd", ["halted"], routing_key="r", transport=_transport(t))
    route = routes([chat, pd])
    assert route(NOTE, frozenset()) == ["chat", "pd"]
    assert route(DONE, frozenset()) == []
    assert route(DONE, frozenset({"pd"})) == ["pd"]


class _Clock:
    def __init__(self) -> None:
        self.t = T0

    def now(self) -> datetime:
        return self.t


def _outbox_with_a_halt(url: str) -> tuple[SqlStore, SqlOutbox]:
    store = SqlStore(url)
    store.add_credential(
        ManagedCredential("payments", "service_account", "sandbox", "c", "u", None, "ed25519"), []
    )
    fresh = Rotation(**{**ROT.__dict__, "version": 1, "halted_reason": None})
    r = store.create_rotation(fresh, Event("rot_1", T0, "operator", "t", trigger="create"))
    store.commit(Change(r.id, r.version, {"halted_reason": "x"}, [_run("halted")]))
    return store, SqlOutbox(store)


@pytest.mark.parametrize(
    ("answer", "status", "outcomes"),
    [
        # a 500 is retried with backoff, until retry_for_seconds: then failed
        (httpx.Response(500), "failed", ["retry", "retry", "failed"]),
        # a 4xx is the sink's refusal: failed at once
        (httpx.Response(404, text="no_service"), "failed", ["failed"]),
    ],
)
def test_delivery_retries_then_gives_up(
    db_url: str, answer: httpx.Response, status: str, outcomes: list[str]
) -> None:
    store, outbox = _outbox_with_a_halt(db_url)
    clock = _Clock()
    sink = sinks.WebhookSink("hook", ["halted"], url="http://h.test/", key="k",
                             transport=_transport(lambda _: answer))  # fmt: skip
    settings = DeliverySettings(retry_for_seconds=10, backoff_base_seconds=2,
                                backoff_max_seconds=4, holder_lost_after_seconds=None)  # fmt: skip
    deliverer = Deliverer(outbox, [sink], clock, settings, "p1")
    for _ in range(6):
        asyncio.run(deliverer.round())
        clock.t += timedelta(seconds=4.1)
    (d,) = outbox.deliveries()
    assert d.status == status
    assert [a.outcome for a in outbox.attempts([d.id])[d.id]] == outcomes
    if len(outcomes) > 1:
        assert d.last_error is not None and "gave up after 10 s" in d.last_error
    store.close()


def test_a_429_waits_as_long_as_the_sink_asks(db_url: str) -> None:
    store, outbox = _outbox_with_a_halt(db_url)
    clock = _Clock()
    busy = httpx.Response(429, headers={"Retry-After": "30"})
    sink = sinks.WebhookSink("hook", ["halted"], url="http://h.test/", key="k",
                             transport=_transport(lambda _: busy))  # fmt: skip
    settings = DeliverySettings(backoff_max_seconds=60, holder_lost_after_seconds=None)
    asyncio.run(Deliverer(outbox, [sink], clock, settings, "p1").round())
    (d,) = outbox.deliveries()
    assert d.status == "pending" and d.last_status_code == 429
    assert d.next_attempt_at is not None and d.next_attempt_at >= T0 + timedelta(seconds=30)
    store.close()


BASE = '[database]\nurl = "sqlite:///k.db"\n'


@pytest.mark.parametrize(
    ("table", "line"),
    [
        ('type = "smtp"', "key notifications.sinks.x.type: 'smtp' is not a sink type; use one"),
        ('type = "slack"', "key notifications.sinks.x: set exactly one of url_env and url_file"),
        (
            'type = "pagerduty"\nrouting_key_env = "A"\nevents = ["completed"]',
            "key notifications.sinks.x.events: completed cannot be listed",
        ),
        (
            'type = "http"\nurl = "http://h"\nsecret_env = "A"\nresend_seconds = 1',
            'key notifications.sinks.x.resend_seconds: does not apply to a sink of type "http"',
        ),
        (
            'type = "alertmanager"\nurl = "am:9093"',
            "key notifications.sinks.x.url: expected an http:// or https:// URL",
        ),
    ],
)
def test_a_bad_sink_is_one_line_naming_its_key(tmp_path: Path, table: str, line: str) -> None:
    from keyturn.config import load_config

    cfg = tmp_path / "k.toml"
    cfg.write_text(BASE + "[notifications.sinks.x]\n" + table + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert line in str(err.value) and "\n" not in str(err.value)


def test_sink_files_are_relative_to_the_config(tmp_path: Path) -> None:
    from keyturn.config import SlackSinkConfig, load_config

    cfg = tmp_path / "k.toml"
    cfg.write_text(BASE + '[notifications.sinks.chat]\ntype = "slack"\nurl_file = "s.url"\n')
    sink = load_config(cfg).notifications.sinks["chat"]
    assert isinstance(sink, SlackSinkConfig) and sink.url_file == tmp_path / "s.url"
    # every kind but those addressed to a person (a sink takes them when it lists them)
    personal = {NoticeKind.USER_TASK.value, NoticeKind.REMINDER.value}
    assert sorted(sink.kinds()) == sorted(k.value for k in NoticeKind if k not in personal)


def test_a_holder_lost_without_takeover_is_noted_and_sent(db_url: str) -> None:
    store = SqlStore(db_url)
    store.add_credential(
        ManagedCredential("payments", "service_account", "sandbox", "c", "u", None, "ed25519"), []
    )
    fresh = Rotation(**{**ROT.__dict__, "version": 1, "halted_reason": None})
    store.create_rotation(fresh, Event("rot_1", T0, "operator", "t", trigger="create"))
    store.claim(owner="w-dead", now=T0, lease_until=T0 + timedelta(seconds=30), limit=1)
    got: list[dict[str, Any]] = []

    def take(request: httpx.Request) -> httpx.Response:
        got.append(json.loads(request.content))
        return httpx.Response(200)

    sink = sinks.WebhookSink("hook", ["holder_lost"], url="http://h.test/", key="k",
                             transport=_transport(take))  # fmt: skip
    clock = _Clock()
    clock.t = T0 + timedelta(seconds=100)  # expired 70 s ago; nobody took it over
    settings = DeliverySettings(holder_lost_after_seconds=60)
    asyncio.run(Deliverer(SqlOutbox(store), [sink], clock, settings, "p1").round())
    (note,) = got
    assert note["kind"] == "holder_lost" and note["rotation_id"] == "rot_1"
    assert "w-dead" in note["reason"] and "keyturn worker" in note["reason"]
    assert [e.detail.get("status") for e in store.events("rot_1")][-1] == "holder_lost"
    store.close()


def test_the_secret_scan_reads_json_documents() -> None:
    from keyturn.testing.secret_scan import scan_json

    key = "pd-routing-key-0123456789abcdef"
    assert scan_json([{"a": [{"b": key}]}], {"rk": key})
    assert scan_json([{"at": T0, "blob": key.encode()}], {"rk": key})  # non-JSON values as text
    assert scan_json([{"t": "é " + key}], {"rk": key})
    assert not scan_json([NOTE, DONE], {"rk": key})


def _outbox_with_a_reminder(url: str) -> tuple[SqlStore, SqlOutbox]:
    store = SqlStore(url)
    store.add_credential(
        ManagedCredential("payments", "service_account", "sandbox", "c", "u", None, "ed25519"), []
    )
    fresh = Rotation(**{**ROT.__dict__, "version": 1, "halted_reason": None})
    r = store.create_rotation(fresh, Event("rot_1", T0, "operator", "t", trigger="create"))
    detail = {"to": "alice", "due": T0.isoformat(), "link_ref": "sec_link", "reminder": 1,
              "at": T0.isoformat()}  # fmt: skip
    store.commit(Change(r.id, r.version, {}, [_run("reminder", **detail)]))
    return store, SqlOutbox(store)


@pytest.mark.parametrize("found", [True, False])
def test_a_person_notice_gets_its_link_at_send_time_only(db_url: str, found: bool) -> None:
    """The outbox keeps the link's secret id; the deliverer opens it (reveal) for the sink. A
    purged or missing secret: sent without the link, and the notification says so."""
    store, outbox = _outbox_with_a_reminder(db_url)
    link = "https://users.example/task/" + "t0k3n" * 6
    sent: list[dict[str, Any]] = []

    def reveal(ref: str) -> str:
        assert ref == "sec_link"
        if not found:
            raise KeyError(ref)
        return link

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200)

    sink = sinks.WebhookSink("users", ["reminder"], url="http://h.test/", key="k",
                             transport=_transport(answer))  # fmt: skip
    settings = DeliverySettings(holder_lost_after_seconds=None)
    asyncio.run(Deliverer(outbox, [sink], _Clock(), settings, "p1", reveal=reveal).round())
    (body,) = sent
    assert body["kind"] == "reminder" and body["to"] == "alice" and body["link_ref"] == "sec_link"
    if found:
        assert body["link"] == link and "link_missing" not in body
    else:
        assert body["link"] is None and "purged or missing" in body["link_missing"]
        assert "purged or missing" in body["summary"]
    (d,) = outbox.deliveries()
    assert d.status == "sent" and "link" not in d.payload and d.payload["link_ref"] == "sec_link"
    store.close()


def test_person_notices_reach_only_the_sinks_that_list_them() -> None:
    from keyturn.config import WebhookSinkConfig

    default = WebhookSinkConfig(type="http", url="http://h.test/", secret_env="X")
    assert "escalated" in default.kinds()
    assert "reminder" not in default.kinds() and "user_task" not in default.kinds()

"""The reference receiver as a real process: secrets rotated under a stream of events.

Events are signed here (HMAC-SHA256 as Dfns does) and sent over real HTTP on loopback; the
secrets file is replaced by the real deploy target while the stream runs.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import random
import secrets as _random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyturn.adapters.secrets_file import ReceiverStateProbe, WebhookSecretsFileTarget
from keyturn.receiver import ReceiverError, ReceiverProcess, start_receiver

SIGNATURE = "X-DFNS-WEBHOOK-SIGNATURE"


def new_secret() -> str:
    return "whs-" + _random.token_hex(20)


def signed(secret: str, event_id: str, *, sent: float | None = None) -> tuple[bytes, str]:
    event = {
        "id": event_id,
        "kind": "wallet.created",
        "date": "2027-01-01T00:00:00.000Z",
        "data": {"walletId": "wa-1"},
        "status": "pending",
        "timestampSent": int(time.time() if sent is None else sent),
        "deliveryAttempt": 1,
    }
    body = json.dumps(event, separators=(",", ":")).encode()
    return body, "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def client(base_url: str) -> httpx.Client:
    """A keep-alive client without Nagle's delay (httpcore writes headers and body apart, and
    the receiver's delayed ACK would otherwise stall every request by ~40 ms)."""
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    return httpx.Client(
        base_url=base_url, timeout=10, transport=httpx.HTTPTransport(socket_options=nodelay)
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


@pytest.fixture
def receivers() -> Iterator[list[ReceiverProcess]]:
    started: list[ReceiverProcess] = []
    yield started
    for process in started:
        process.close()


def run_receiver(
    receivers: list[ReceiverProcess], secrets_file: Path, **kwargs: Any
) -> ReceiverProcess:
    process = start_receiver(secrets_file, **kwargs)
    receivers.append(process)
    return process


# ------------------------------------------------------------------------------- start-up


def serve_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyturn.receiver", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_missing_secrets_file_is_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    result = serve_command("--secrets", str(tmp_path / "absent.json"), "--port", "0")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("keyturn: error: secrets file ")
    assert "does not exist" in lines[0]


def test_an_invalid_secrets_file_is_one_line_without_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    secret = new_secret()
    path.write_text('{"secrets": ["' + secret + '", ""]}')
    result = serve_command("--secrets", str(path), "--port", "0")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "secret #2" in lines[0]
    assert secret not in result.stderr


def test_a_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    WebhookSecretsFileTarget("hooks", path).deploy([new_secret()])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = serve_command("--secrets", str(path), "--port", str(port))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot listen on 127.0.0.1:" in lines[0], result.stderr


def test_start_receiver_reports_a_failed_start(tmp_path: Path) -> None:
    with pytest.raises(ReceiverError) as caught:
        start_receiver(tmp_path / "absent.json")
    assert "exited with code 1" in str(caught.value)
    assert "does not exist" in str(caught.value)


# ------------------------------------------------------------------------------ behaviour


def test_each_rejection_is_answered_and_counted_by_reason(
    tmp_path: Path, receivers: list[ReceiverProcess]
) -> None:
    path = tmp_path / "secrets.json"
    good, other = new_secret(), new_secret()
    version = WebhookSecretsFileTarget("hooks", path).deploy([good])
    receiver = run_receiver(receivers, path, record=tmp_path / "record.jsonl")
    state = receiver.state()
    assert state["secrets_version"] == version
    assert state["secrets_count"] == 1

    cases: list[tuple[str, bytes, dict[str, str]]] = []
    body, header = signed(good, "whe-ok")
    cases.append(("accepted", body, {SIGNATURE: header}))
    body, header = signed(other, "whe-wrong")
    cases.append(("bad_signature", body, {SIGNATURE: header}))
    body, header = signed(good, "whe-tampered")
    cases.append(("bad_signature", body.replace(b"wa-1", b"wa-2"), {SIGNATURE: header}))
    body, header = signed(good, "whe-old", sent=time.time() - 301)
    cases.append(("stale", body, {SIGNATURE: header}))
    body, header = signed(good, "whe-future", sent=time.time() + 400)
    cases.append(("stale", body, {SIGNATURE: header}))
    body, _ = signed(good, "whe-unsigned")
    cases.append(("missing_header", body, {}))
    cases.append(("malformed_header", body, {SIGNATURE: "sha256=123"}))
    garbage = b"this is not json"
    garbage_header = "sha256=" + hmac.new(good.encode(), garbage, hashlib.sha256).hexdigest()
    cases.append(("malformed_body", garbage, {SIGNATURE: garbage_header}))

    with client(receiver.url) as http:
        for expected, body, headers in cases:
            response = http.post("/dfns/events", content=body, headers=headers)
            if expected == "accepted":
                assert response.status_code == 200, response.text
            else:
                assert response.status_code == 401, expected
                assert response.json()["error"]["reason"] == expected
                assert good not in response.text and other not in response.text
        # a delivery of the same event again: acknowledged, not counted twice
        body, header = signed(good, "whe-ok")
        again = http.post("/", content=body, headers={SIGNATURE: header})
        assert again.status_code == 200 and again.json()["duplicate"] is True

    state = receiver.state(ids=True)
    assert state["accepted"] == 1
    assert state["accepted_ids"] == ["whe-ok"]
    assert state["duplicates"] == 1
    assert state["rejected"] == 7
    assert state["rejections"] == {
        "bad_signature": 2,
        "stale": 2,
        "missing_header": 1,
        "malformed_header": 1,
        "malformed_body": 1,
    }
    rejected_ids = [entry["id"] for entry in state["rejected_events"]]
    assert rejected_ids[:3] == ["whe-wrong", "whe-tampered", "whe-old"]
    assert receiver.stop() == 0  # SIGTERM: graceful, exit 0
    lines = [json.loads(line) for line in (tmp_path / "record.jsonl").read_text().splitlines()]
    assert [line["result"] for line in lines].count("rejected") == 7
    assert [line["id"] for line in lines if line["result"] == "accepted"] == ["whe-ok"]
    assert good not in (tmp_path / "record.jsonl").read_text()


@dataclass
class Sent:
    event_id: str
    secret: str
    status: int
    reason: str | None
    first: int  # the secrets file generation current when the event was signed
    last: int  # the generation current (or being written) when the answer came back


def test_rotating_the_secrets_file_under_traffic_rejects_no_event_signed_with_a_held_secret(
    tmp_path: Path, receivers: list[ReceiverProcess]
) -> None:
    """[s0] -> [s0, s1] -> [s1] -> [s1, s2] -> [s2] -> ..., while four senders stream events.

    An event signed with a secret that every file generation during its request holds must be
    accepted; one signed with a secret none of them holds must be refused.
    """
    path = tmp_path / "secrets.json"
    target = WebhookSecretsFileTarget("hooks", path)
    keys = [new_secret() for _ in range(4)]
    plan: list[list[str]] = [[keys[0]]]
    for old, new in itertools.pairwise(keys):
        plan += [[old, new], [new]]
    history: list[tuple[str, ...]] = [tuple(plan[0])]
    target.deploy(plan[0])
    receiver = run_receiver(receivers, path, record=tmp_path / "record.jsonl")
    probe = ReceiverStateProbe("receiver", receiver.url)
    lock = threading.Lock()
    writing = [False]  # a new generation is being written (not yet in `history`)
    done = threading.Event()
    confirm_latencies: list[float] = []
    errors: list[BaseException] = []

    def rotate() -> None:
        try:
            for secrets in plan[1:]:
                time.sleep(0.35)
                with lock:
                    writing[0] = True
                version = target.deploy(secrets)
                with lock:
                    history.append(tuple(secrets))
                    writing[0] = False
                began = time.monotonic()
                probe.wait_for_version(version, timeout=5)  # the deployer's confirmation
                confirm_latencies.append(time.monotonic() - began)
            time.sleep(0.35)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    results: list[Sent] = []

    def send(worker: int) -> None:
        chooser = random.Random(worker)
        sequence = 0
        try:
            with client(receiver.url) as http:
                while not done.is_set():
                    with lock:
                        first = len(history) - 1
                        held = history[first]
                    if chooser.random() < 0.9:
                        secret = chooser.choice(held)
                    else:  # a secret the receiver does not hold now (retired or not yet out)
                        secret = chooser.choice([k for k in keys if k not in held])
                    sequence += 1
                    event_id = f"whe-w{worker}-{sequence}"
                    body, header = signed(secret, event_id)
                    response = http.post("/hook", content=body, headers={SIGNATURE: header})
                    with lock:
                        last = len(history) - (0 if writing[0] else 1)
                    reason = None
                    if response.status_code != 200:
                        reason = response.json()["error"]["reason"]
                    results.append(
                        Sent(event_id, secret, response.status_code, reason, first, last)
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rotate)]
    threads += [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors

    must_accept: list[Sent] = []
    must_reject: list[Sent] = []
    undecided: list[Sent] = []
    for sent in results:
        # the generations the receiver may have seen: from the one current at signing time to
        # the one current (or being written) when the answer came back
        window = history[sent.first : sent.last + 1]
        if all(sent.secret in generation for generation in window):
            must_accept.append(sent)
        elif all(sent.secret not in generation for generation in window):
            must_reject.append(sent)
        else:
            undecided.append(sent)

    wrongly_rejected = [s for s in must_accept if s.status != 200]
    assert wrongly_rejected == [], wrongly_rejected[:5]
    assert [s for s in must_reject if (s.status, s.reason) != (401, "bad_signature")] == []
    assert len(must_accept) >= 300, f"only {len(must_accept)} events sent"
    assert len(must_reject) >= 10
    assert len(undecided) <= len(results) // 10
    # events were signed with every secret, during every overlap
    assert {s.secret for s in must_accept if s.status == 200} == set(keys)
    assert len(history) == len(plan)
    assert max(confirm_latencies) < 1.0

    state = receiver.state(ids=True)
    accepted = [s.event_id for s in results if s.status == 200]
    assert state["accepted"] == len(accepted)
    assert set(state["accepted_ids"]) == set(accepted)
    assert state["rejected"] == len(results) - len(accepted)
    assert set(state["rejections"]) <= {"bad_signature"}
    assert state["secrets_count"] == 1
    assert state["secrets_version"] == target.read_back()[0]

    receiver.kill()  # the record survives a crash: every line was flushed
    lines = [json.loads(line) for line in (tmp_path / "record.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines if line["result"] == "accepted"] == state["accepted_ids"]
    assert sum(line["result"] == "rejected" for line in lines) == state["rejected"]


def test_the_receiver_keeps_up_with_500_events_per_second(
    tmp_path: Path, receivers: list[ReceiverProcess]
) -> None:
    """Measured as events handled per CPU-second of the receiver process, so that the load the
    test client itself puts on the box does not count against the receiver."""
    path = tmp_path / "secrets.json"
    secret = new_secret()
    WebhookSecretsFileTarget("hooks", path).deploy([new_secret(), secret])
    receiver = run_receiver(receivers, path, record=tmp_path / "record.jsonl")
    events = [signed(secret, f"whe-load-{n}") for n in range(1500)]
    errors: list[BaseException] = []

    def send(chunk: list[tuple[bytes, str]]) -> None:
        try:
            with client(receiver.url) as http:
                for body, header in chunk:
                    response = http.post("/", content=body, headers={SIGNATURE: header})
                    assert response.status_code == 200, response.text
        except BaseException as exc:
            errors.append(exc)

    cpu_before = cpu_seconds(receiver.pid)
    began = time.monotonic()
    threads = [threading.Thread(target=send, args=(events[n::4],)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    wall = time.monotonic() - began
    cpu = max(cpu_seconds(receiver.pid) - cpu_before, 0.01)
    assert not errors, errors[:3]
    assert receiver.state()["accepted"] == len(events)
    capacity = len(events) / cpu
    print(f"receiver: {len(events) / wall:.0f} events/s wall, {capacity:.0f} per CPU-second")
    assert capacity >= 500, f"the receiver needs {cpu:.2f} CPU-s for {len(events)} events"

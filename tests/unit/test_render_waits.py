"""How a waiting rotation is shown: status, --json shape, `rotations show`, `rotations list`."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

from rich.console import Console

from keyturn.cli import render
from keyturn.domain.lifecycle import State
from keyturn.domain.model import CredentialKind, OperatorAction, OperatorRequest, Rotation

SINCE = datetime(2026, 1, 1, 10, 2, 11, tzinfo=UTC)
DEADLINE = SINCE + timedelta(minutes=10)
CHECK = SINCE + timedelta(seconds=15)


def _waiting(**kw: object) -> Rotation:
    values: dict[str, object] = {
        "id": "rot-0001",
        "credential": "svc",
        "kind": CredentialKind.SERVICE_ACCOUNT,
        "state": State.NEW_ADDED,
        "version": 4,
        "reason": "scheduled",
        "created_at": SINCE - timedelta(minutes=1),
        "updated_at": SINCE,
        "next_attempt_at": CHECK,
        "wait_key": "forward.confirm_loaded",
        "wait_for": "receivers to load secrets version 3",
        "wait_since": SINCE,
        "wait_deadline": DEADLINE,
    }
    values.update(kw)
    return Rotation(**values)  # type: ignore[arg-type]


def test_status_of_a_waiting_rotation_says_what_since_and_until_when() -> None:
    assert render.status_of(_waiting()) == (
        "waiting for receivers to load secrets version 3 since 2026-01-01 10:02:11 UTC, "
        "deadline 2026-01-01 10:12:11 UTC"
    )


def test_status_shows_utc_whatever_the_zone_and_one_line() -> None:
    plus2 = timezone(timedelta(hours=2))
    r = _waiting(wait_since=SINCE.astimezone(plus2), wait_for="approval\nby  alice")
    assert (
        render.status_of(r) == "waiting for approval by alice since 2026-01-01 10:02:11 UTC, "
        "deadline 2026-01-01 10:12:11 UTC"
    )


def test_a_wait_across_days_shows_the_dates() -> None:
    r = _waiting(wait_deadline=SINCE + timedelta(days=2))
    assert render.status_of(r) == (
        "waiting for receivers to load secrets version 3 since 2026-01-01 10:02:11 UTC, "
        "deadline 2026-01-03 10:02:11 UTC"
    )


def test_a_wait_without_deadline_or_since() -> None:
    assert render.status_of(_waiting(wait_deadline=None)) == (
        "waiting for receivers to load secrets version 3 since 2026-01-01 10:02:11 UTC"
    )
    assert render.status_of(_waiting(wait_since=None, wait_deadline=None)) == (
        "waiting for receivers to load secrets version 3"
    )


def test_halted_paused_requested_and_done_win_over_the_wait() -> None:
    assert render.status_of(_waiting(halted_reason="deadline passed")) == "HALTED"
    assert render.status_of(_waiting(paused=True)) == "paused"
    request = OperatorRequest(OperatorAction.ROLLBACK, "alice", "bad key", SINCE)
    assert render.status_of(_waiting(request=request)) == "rollback requested"
    assert render.status_of(_waiting(state=State.OLD_DEACTIVATED)) == "done"


def test_a_check_in_progress_still_shows_the_wait() -> None:
    r = _waiting(lease_owner="w1", lease_expires_at=CHECK + timedelta(seconds=30))
    assert render.status_of(r).startswith("waiting for receivers")


def test_not_waiting_is_unchanged() -> None:
    r = _waiting(wait_key=None, wait_for=None, wait_since=None, wait_deadline=None)
    assert render.status_of(r) == "due"
    assert render.status_of(replace(r, attempts=2)) == "retrying (2)"
    assert render.status_of(replace(r, lease_owner="w1")) == "running"


def test_rotation_dict_has_the_wait_as_iso_strings_or_null() -> None:
    d = render.rotation_dict(_waiting())
    assert d["wait_key"] == "forward.confirm_loaded"
    assert d["wait_for"] == "receivers to load secrets version 3"
    assert d["wait_since"] == "2026-01-01T10:02:11+00:00"
    assert d["wait_deadline"] == "2026-01-01T10:12:11+00:00"
    assert d["next_attempt_at"] == "2026-01-01T10:02:26+00:00"
    json.loads(render.dump(d))

    idle = render.rotation_dict(
        _waiting(wait_key=None, wait_for=None, wait_since=None, wait_deadline=None)
    )
    assert {k: idle[k] for k in ("wait_key", "wait_for", "wait_since", "wait_deadline")} == {
        "wait_key": None,
        "wait_for": None,
        "wait_since": None,
        "wait_deadline": None,
    }


def _console(width: int = 200) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, highlight=False, color_system=None), buf


def test_show_rotation_prints_the_wait_with_its_next_check() -> None:
    console, buf = _console()
    render.show_rotation(console, _waiting(wait_for="holder [svc-a] to confirm"), [], [])
    lines = buf.getvalue().splitlines()
    waiting = [line for line in lines if line.strip().startswith("waiting")]
    assert waiting == [
        "  waiting    for holder [svc-a] to confirm (forward.confirm_loaded) since "
        "2026-01-01 10:02:11 UTC, deadline 2026-01-01 10:12:11 UTC, "
        "next check 2026-01-01 10:02:26 UTC"
    ]
    # The status line too, and the engine's words are never read as markup.
    assert any(
        "status waiting for holder [svc-a] to confirm since 2026-01-01 10:02:11 UTC" in x
        for x in lines
    )
    assert not any("next attempt" in line for line in lines)


def test_show_rotation_not_waiting_is_unchanged() -> None:
    console, buf = _console()
    r = _waiting(wait_key=None, wait_for=None, wait_since=None, wait_deadline=None)
    render.show_rotation(console, r, [], [])
    out = buf.getvalue()
    assert "waiting" not in out
    assert "next attempt 2026-01-01 10:02:26 UTC" in out


def test_the_list_keeps_its_columns_with_a_long_wait() -> None:
    """On a narrow terminal the status wraps inside its column; id, state and the update time
    stay whole on the row's first line."""
    rows = [
        _waiting(id="rot-0001"),
        _waiting(id="rot-0002", wait_key=None, wait_for=None, wait_since=None, wait_deadline=None),
    ]
    for width in (200, 80):
        console, buf = _console(width)
        console.print(render.rotations_table(rows))
        lines = buf.getvalue().splitlines()
        header = lines[0]
        status_at = header.index("status")
        attempts_at = header.index("attempts")
        assert lines[1].split()[:3] == ["rot-0001", "svc", "new_added"]
        assert "2026-01-01 10:02:11" in lines[1]
        assert lines[1][status_at:].startswith("waiting")
        second = next(line for line in lines if line.split()[:1] == ["rot-0002"])
        assert second[status_at:].startswith("due")
        assert second[attempts_at:].startswith("0")
        text = " ".join(line[status_at:attempts_at].strip() for line in lines[1:])
        assert "receivers to load secrets version 3" in " ".join(text.split())
        if width == 200:
            assert len(lines) == 3  # header and one line per rotation

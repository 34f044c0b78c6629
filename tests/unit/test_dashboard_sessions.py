"""The dashboard's sessions (keyturn.web.pages.Sessions): opaque ids that expire, and the
lifecycle graph's drawing from the graph data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from keyturn.domain.lifecycle import EDGES, State
from keyturn.web import graph
from keyturn.web.pages import Sessions, utc


def test_a_session_expires_and_its_id_is_opaque() -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    sessions = Sessions(lambda: now[0], seconds=60)
    sid, session = sessions.create("hash-of-token")
    assert "hash-of-token" not in sid and len(sid) >= 40 and session.csrf != sid
    assert sessions.get(sid) is session
    assert sessions.get("not-a-session") is None and sessions.get(None) is None
    now[0] += timedelta(seconds=59)
    assert sessions.get(sid) is session
    now[0] += timedelta(seconds=2)
    assert sessions.get(sid) is None  # expired: gone for good
    now[0] -= timedelta(seconds=30)
    assert sessions.get(sid) is None
    other, _ = sessions.create("h2")
    sessions.drop(other)
    assert sessions.get(other) is None


def test_times_are_utc_and_marked() -> None:
    assert utc("2026-03-01T10:00:00+02:00") == "2026-03-01 08:00:00 UTC"
    assert utc(None) == "-"


def test_the_graph_draws_every_state_and_edge_and_marks_the_current_one() -> None:
    drawn = str(graph.svg(State.VERIFIED))
    for s in State:
        assert f'data-state="{s.value}"' in drawn
    assert drawn.count("<line ") == len(EDGES)
    assert 'class="node now" data-state="verified"' in drawn
    assert drawn.count("(now)") == 1
    boxes = graph.layout()
    assert len({(n.x, n.y) for n in boxes.values()}) == len(State)  # no two overlap

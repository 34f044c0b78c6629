"""What `rotations list` and ``GET /v1/rotations`` list: the store narrows in its query, the
status and attention definitions (keyturn.engine.attention) decide. Light on imports: a read
command loads it."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from keyturn.domain.lifecycle import State
from keyturn.domain.model import Rotation
from keyturn.engine.attention import REQUEST_STALE, attention, status_key
from keyturn.ports import RotationQuery, Store


def list_rotations(
    store: Store,
    now: datetime,
    *,
    state: State | None = None,
    status: str | None = None,
    credential: str | None = None,
    kind: str | None = None,
    holder: str | None = None,
    attention_only: bool = False,
    since: datetime | None = None,
    before: tuple[datetime, str] | None = None,
    limit: int | None = None,
) -> tuple[list[Rotation], bool]:
    """What `rotations list` and ``GET /v1/rotations`` show: up to `limit` rotations, newest
    first, older than `before` (a cursor), and whether more follow. The store narrows in its
    query (every filter, the cursor and the limit); its condition for a status or attention
    may be wider than their definitions (keyturn.engine.attention), which decide here, on
    the rows it returns (reading on, a batch at a time, while they fall short)."""
    query = RotationQuery(
        state=state,
        credential=credential,
        kind=kind,
        holder=holder,
        status=status,
        attention_at=now if attention_only else None,
        request_stale_before=now - REQUEST_STALE if attention_only else None,
        updated_since=since,
    )

    def wanted(r: Rotation) -> bool:
        return (status is None or status_key(r) == status) and (
            not attention_only or attention(r, now) is not None
        )

    out: list[Rotation] = []
    batch = None if limit is None else limit + 1
    while True:
        rows = store.find_rotations(replace(query, before=before, limit=batch))
        for r in rows:
            if wanted(r):
                out.append(r)
                if limit is not None and len(out) > limit:
                    return out[:limit], True
        if batch is None or len(rows) < batch:
            return out, False
        before = (rows[-1].created_at, rows[-1].id)
        batch = min(batch * 4, 10_000)

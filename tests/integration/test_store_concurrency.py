"""Two worker PROCESSES claim from one database at once: each rotation is claimed exactly once.

On SQLite both processes share one file (WAL, BEGIN IMMEDIATE, busy timeout: no "database is
locked"); on PostgreSQL the claim's FOR UPDATE SKIP LOCKED keeps them apart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.lifecycle import State
from keyturn.domain.model import CredentialKind, Event, ManagedCredential, Rotation

ROTATIONS = 200

WORKER = r"""
import json, sys, time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.lifecycle import State
from keyturn.domain.model import Event
from keyturn.ports import Change

url, owner, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
store = SqlStore(url)
store.list_credentials()  # connect before the race starts
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
claimed = []
first = True
while True:
    now = datetime.now(UTC)
    batch = store.claim(owner=owner, now=now, lease_until=now + timedelta(hours=1), limit=3)
    if not batch:
        break  # every rotation left is finished or leased by the other worker
    if first:
        # Rendezvous: both workers hold a claim before either goes on, so on a loaded machine
        # one process cannot drain the queue before the other is scheduled at all.
        first = False
        Path(f"{go}.{owner}").touch()
        deadline = time.monotonic() + 30
        while len(list(go.parent.glob(go.name + ".worker-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
    for rotation in batch:
        claimed.append(rotation.id)
        store.commit(
            Change(
                rotation.id,
                rotation.version,
                updates={
                    "state": State.CANCELLED,
                    "finished_at": now,
                    "lease_owner": None,
                    "lease_expires_at": None,
                },
                events=[Event(rotation_id=rotation.id, at=now, kind="run", actor=owner)],
            )
        )
store.close()
print(json.dumps(claimed), flush=True)
"""


def _seed(url: str) -> list[str]:
    now = datetime.now(UTC)
    store = SqlStore(url)
    ids = []
    try:
        for i in range(ROTATIONS):
            name = f"cred-{i:03d}"
            store.add_credential(
                ManagedCredential(
                    name=name,
                    kind=CredentialKind.PAT,
                    provider="sandbox",
                    credential_id=f"cid-{i}",
                    credential_uuid=f"cr-{i}",
                    key_ref=None,
                    algorithm="ed25519",
                ),
                [],
            )
            rotation = Rotation(
                id=f"rot-{i:03d}",
                credential=name,
                kind=CredentialKind.PAT,
                state=State.PENDING,
                version=1,
                reason="race",
                created_at=now,
                updated_at=now,
            )
            store.create_rotation(
                rotation, Event(rotation_id=rotation.id, at=now, kind="transition", actor="t")
            )
            ids.append(rotation.id)
    finally:
        store.close()
    return ids


def test_two_processes_claim_each_rotation_exactly_once(db_url: str, tmp_path: Path) -> None:
    ids = _seed(db_url)
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, db_url, f"worker-{n}", str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 2)
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "ready"
        go.touch()
        results = [w.communicate(timeout=120) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()

    claimed: list[list[str]] = []
    for w, (out, err) in zip(workers, results, strict=True):
        assert w.returncode == 0, err
        assert "database is locked" not in err
        claimed.append(json.loads(out.strip().splitlines()[-1]))

    counts = Counter(rid for batch in claimed for rid in batch)
    assert sorted(counts) == sorted(ids)
    assert [rid for rid, n in counts.items() if n != 1] == []
    # Both really raced (each got a share), and no rotation was touched more than planned:
    # version 1 at creation, +1 for the claim, +1 for the commit.
    assert all(batch for batch in claimed), [len(b) for b in claimed]
    store = SqlStore(db_url)
    try:
        rotations = store.list_rotations()
        assert {r.version for r in rotations} == {3}
        assert all(r.finished_at is not None and r.lease_owner is None for r in rotations)
    finally:
        store.close()

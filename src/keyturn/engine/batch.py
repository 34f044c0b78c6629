"""Group commit: the rotations a worker has in flight share database transactions.

Each rotation still waits for its own commit before it acts (intent before effect holds per
rotation); while one batch is being written, the next collects, so under load many rotations'
writes share a transaction and at light load nothing waits.
"""

from __future__ import annotations

import asyncio
import contextlib

from keyturn.domain.errors import KeyturnError
from keyturn.domain.model import Rotation
from keyturn.ports import Change, Store


class CommitBatcher:
    def __init__(self, store: Store, *, max_batch: int = 128) -> None:
        self._store = store
        self._max = max_batch
        self._queue: list[tuple[Change, asyncio.Future[Rotation]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Transactions written and changes they carried (for logs and benchmarks).
        self.batches = 0
        self.changes = 0

    async def commit(self, change: Change) -> Rotation:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="commit-batcher")
        future: asyncio.Future[Rotation] = asyncio.get_running_loop().create_future()
        self._queue.append((change, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
                try:
                    results = await asyncio.to_thread(
                        self._store.commit_many, [change for change, _ in batch]
                    )
                except Exception as exc:  # StoreUnavailable, or a bug: every waiter hears it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.batches += 1
                self.changes += len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, KeyturnError):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

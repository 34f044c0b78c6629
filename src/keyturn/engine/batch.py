"""Group commit: the rotations a worker has in flight share database transactions.

Each rotation still waits for its own commit before it acts (intent before effect holds per
rotation); while one batch is being written, the next collects, so under load many rotations'
writes share a transaction and at light load nothing waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from keyturn.domain.errors import KeyturnError
from keyturn.domain.model import ActionRecord, ManagedCredential, Rotation, SealedSecret
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


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BatchLoader(Generic[K, V]):
    """Reads shared by a worker's rotations: the keys asked for while one read is running are
    read together by the next, in one statement (at light load nothing waits)."""

    def __init__(self, fetch_many: Callable[[list[K]], Mapping[K, V]]) -> None:
        self._fetch = fetch_many
        self._pending: dict[K, list[asyncio.Future[V | None]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def load(self, key: K) -> V | None:
        """The value of `key`, or None when the store has none."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="batch-loader")
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append(future)
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    found = await asyncio.to_thread(self._fetch, list(batch))
                except Exception as exc:  # StoreUnavailable, or a bug: every waiter hears it
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for key, futures in batch.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(found.get(key))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class Loaders:
    """The batched reads of one worker."""

    secrets: BatchLoader[str, SealedSecret]
    actions: BatchLoader[str, list[ActionRecord]]
    credentials: BatchLoader[str, ManagedCredential]

    @classmethod
    def of(cls, store: Store) -> Loaders:
        return cls(
            BatchLoader(store.get_secrets),
            BatchLoader(store.actions_of),
            BatchLoader(store.get_credentials),
        )

    async def aclose(self) -> None:
        for loader in (self.secrets, self.actions, self.credentials):
            await loader.aclose()

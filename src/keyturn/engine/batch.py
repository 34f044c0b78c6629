"""Group commit: the rotations a worker has in flight share database transactions.

Each rotation still waits for its own commit before it acts (intent before effect holds per
rotation); while one batch is being written, the next collects, so under load many rotations'
writes share a transaction and at light load nothing waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from keyturn.domain.model import ActionRecord, ManagedCredential, Rotation, SealedSecret
from keyturn.ports import Change, Store

Q = TypeVar("Q")
R = TypeVar("R")


class Coalescer(Generic[Q, R]):
    """Requests that arrive while one batch is in the database go together in the next: one
    call of :meth:`handle` (in a thread) per batch, its results handed back in order (an
    exception result is raised to its own caller only)."""

    name = "coalescer"
    max_batch = 1 << 30

    def __init__(self) -> None:
        self._queue: list[tuple[Q, asyncio.Future[R]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Batches handled and requests they carried (for logs and benchmarks).
        self.batches = 0
        self.requests = 0

    def handle(self, requests: list[Q]) -> Sequence[R | BaseException]:
        raise NotImplementedError

    async def submit(self, request: Q) -> R:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=self.name)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._queue[: self.max_batch]
                self._queue = self._queue[self.max_batch :]
                try:
                    results = await asyncio.to_thread(self.handle, [q for q, _ in batch])
                except Exception as exc:  # StoreUnavailable, or a bug: every waiter hears it
                    results = [exc] * len(batch)
                else:
                    self.batches += 1
                    self.requests += len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class CommitBatcher(Coalescer[Change, Rotation]):
    """A worker's group commit (see the module's docstring)."""

    name = "commit-batcher"

    def __init__(self, store: Store, *, max_batch: int = 128) -> None:
        super().__init__()
        self._store = store
        self.max_batch = max_batch

    def handle(self, requests: list[Change]) -> Sequence[Rotation | BaseException]:
        return self._store.commit_many(requests)

    async def commit(self, change: Change) -> Rotation:
        return await self.submit(change)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BatchLoader(Coalescer[K, V | None]):
    """Reads shared by a worker's rotations: the keys asked for while one read is running are
    read together by the next, in one statement (at light load nothing waits)."""

    name = "batch-loader"

    def __init__(self, fetch_many: Callable[[list[K]], Mapping[K, V]]) -> None:
        super().__init__()
        self._fetch = fetch_many

    def handle(self, requests: list[K]) -> Sequence[V | BaseException | None]:
        found = self._fetch(list(dict.fromkeys(requests)))
        return [found.get(key) for key in requests]

    async def load(self, key: K) -> V | None:
        """The value of `key`, or None when the store has none."""
        return await self.submit(key)


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

    @classmethod
    def direct(cls, store: Store) -> Loaders:
        """Reads one at a time, for a run outside a worker (nothing to close)."""
        return cls(
            DirectLoader(store.get_secrets),
            DirectLoader(store.actions_of),
            DirectLoader(store.get_credentials),
        )

    async def aclose(self) -> None:
        for loader in (self.secrets, self.actions, self.credentials):
            await loader.aclose()


class DirectLoader(BatchLoader[K, V]):
    """A loader that reads at once, in a thread, with no background task."""

    async def load(self, key: K) -> V | None:
        return (await asyncio.to_thread(self._fetch, [key])).get(key)

    async def aclose(self) -> None:
        return None

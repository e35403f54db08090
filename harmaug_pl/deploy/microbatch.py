"""Dynamic micro-batching: the rows of concurrent requests share one model call.

A request's rows join one bounded FIFO queue. A single worker task takes up to ``max_batch_size``
rows as soon as that many are queued, or when the oldest queued row has waited ``max_wait_s``
(the wait budget), and scores them in one call on a dedicated thread, so the event loop keeps
accepting requests meanwhile. A request longer than the batch size spans several calls; its
answer comes when all its rows are scored. A full queue refuses new rows at once
(:class:`QueueFull`, with a retry delay estimated from the recent throughput) instead of letting
latency grow without bound.

FastAPI and uvicorn have no batching, and LitServe's (the one peer that does) sits behind an
unbounded cross-process queue; this is the small piece we keep.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFull(Exception):
    """The queue cannot take a request's rows now; ``retry_after`` seconds is a fair wait."""

    def __init__(self, queued: int, limit: int, retry_after: int) -> None:
        super().__init__(f"{queued} rows queued (limit {limit}): retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Request(Generic[Result]):
    future: asyncio.Future
    results: list[Result | None]
    remaining: int


@dataclass
class _Queued(Generic[Item]):
    row: Item
    request: _Request
    index: int
    since: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[Item, Result]):
    """Group rows from concurrent :meth:`submit` calls into calls of ``score(rows) -> results``.

    ``on_batch(rows, seconds, cpu_seconds)`` is told the size, duration and CPU time (of the
    thread that ran it, so other processes' load does not count) of every call, for metrics.
    """

    def __init__(
        self,
        score: Callable[[list[Item]], Sequence[Result]],
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_queue_rows: int = 256,
        on_batch: Callable[[int, float, float], Any] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_rows < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue_rows must be >= 1 and max_wait_s >= 0")
        self.score = score
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_rows = max_queue_rows
        self.on_batch = on_batch
        self._queue: deque[_Queued[Item]] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harmaug-model")
        self._worker: asyncio.Task | None = None
        self._stopping = False
        self._rows_per_s = 0.0  # smoothed throughput of recent calls, for Retry-After

    @property
    def queued_rows(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="harmaug-microbatcher")

    async def stop(self) -> None:
        """Score what is still queued, then stop the worker and its thread."""
        self._stopping = True
        self._arrived.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1)."""
        if self._rows_per_s <= 0:
            return 1
        return max(1, math.ceil(len(self._queue) / self._rows_per_s))

    async def submit(self, rows: Sequence[Item]) -> list[Result]:
        """Queue ``rows`` and wait for their results (in order); :class:`QueueFull` when full."""
        if self._stopping or not self.running:
            raise RuntimeError("the batcher is not running")
        if len(self._queue) + len(rows) > self.max_queue_rows:
            raise QueueFull(len(self._queue), self.max_queue_rows, self.retry_after())
        if not rows:
            return []
        request: _Request[Result] = _Request(
            asyncio.get_running_loop().create_future(), [None] * len(rows), len(rows)
        )
        self._queue.extend(_Queued(row, request, i) for i, row in enumerate(rows))
        self._arrived.set()
        return await request.future

    async def _next_batch(self) -> list[_Queued[Item]]:
        """Wait for a first row, then for a full batch or the oldest row's wait budget."""
        loop = asyncio.get_running_loop()
        while not self._queue:
            if self._stopping:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        deadline = loop.time() + self.max_wait_s - (time.monotonic() - self._queue[0].since)
        while len(self._queue) < self.max_batch_size and not self._stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]

    def _timed(self, rows: list[Item]) -> tuple[Sequence[Result], float]:
        started = time.thread_time()
        results = self.score(rows)
        return results, time.thread_time() - started

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while batch := await self._next_batch():
            started = time.perf_counter()
            try:
                results, cpu = await loop.run_in_executor(self._executor, self._timed, [q.row for q in batch])
            except Exception as error:  # the model failed on this batch: its requests fail, others go on
                for queued in batch:
                    if not queued.request.future.done():
                        queued.request.future.set_exception(error)
                continue
            seconds = time.perf_counter() - started
            rate = len(batch) / max(seconds, 1e-9)
            self._rows_per_s = rate if self._rows_per_s == 0 else 0.8 * self._rows_per_s + 0.2 * rate
            if self.on_batch is not None:
                self.on_batch(len(batch), seconds, cpu)
            for queued, result in zip(batch, results, strict=True):
                request = queued.request
                request.results[queued.index] = result
                request.remaining -= 1
                if request.remaining == 0 and not request.future.done():
                    request.future.set_result(request.results)

"""Dynamic micro-batching: the rows of concurrent requests share one model call.

A request's rows join a bounded queue. A single worker task fills a model call of up to
``max_batch_size`` rows as soon as that many can go, or when the oldest waiting request has waited
``max_wait_s`` (the wait budget), and scores it on a dedicated thread, so the event loop keeps
accepting requests meanwhile. Calls take turns between requests: each waiting request puts at
most ``turn_rows`` rows into a call, then goes behind the others, so a one-row request sent while
a 64-row request is scored waits for one short call, not for the whole large request. A full
queue refuses new rows at once (:class:`QueueFull`, with a retry delay estimated from the recent
throughput) instead of letting latency grow without bound.

Failures stay with their request: if a call fails, its requests' rows are scored again one request
at a time, so only the request whose rows fail gets the error. A request whose caller stopped
waiting (the client disconnected) leaves the queue. Nothing a call raises stops the worker.

FastAPI and uvicorn have no batching, and LitServe's (the one peer that does) sits behind an
unbounded cross-process queue; this is the small piece we keep.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue cannot take a request's rows now; ``retry_after`` seconds is a fair wait."""

    def __init__(self, queued: int, limit: int, retry_after: int) -> None:
        super().__init__(f"{queued} rows queued (limit {limit}): retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class _Request(Generic[Item, Result]):
    rows: Sequence[Item]
    future: asyncio.Future
    results: list[Result | None]
    taken: int = 0  # rows handed to a call so far
    scored: int = 0
    since: float = field(default_factory=time.monotonic)

    @property
    def waiting(self) -> int:
        return len(self.rows) - self.taken


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
        turn_rows: int | None = None,
    ) -> None:
        if (
            max_batch_size < 1
            or max_queue_rows < 1
            or max_wait_s < 0
            or (turn_rows is not None and turn_rows < 1)
        ):
            raise ValueError("max_batch_size, max_queue_rows and turn_rows must be >= 1 and max_wait_s >= 0")
        self.score = score
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_rows = max_queue_rows
        self.on_batch = on_batch
        self.turn_rows = turn_rows or max_batch_size
        self._queue: deque[_Request[Item, Result]] = deque()  # requests with rows not yet in a call
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harmaug-model")
        self._worker: asyncio.Task | None = None
        self._stopping = False
        self._rows_per_s = 0.0  # smoothed throughput of recent calls, for Retry-After

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def full(self) -> bool:
        """No request, not even one row, can be queued now."""
        return self._queued_rows >= self.max_queue_rows

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
        return max(1, math.ceil(self._queued_rows / self._rows_per_s))

    async def submit(self, rows: Sequence[Item]) -> list[Result]:
        """Queue ``rows`` and wait for their results (in order); :class:`QueueFull` when full.

        Cancelling the wait (the caller gave up) takes the request's remaining rows out of the queue.
        """
        if self._stopping or not self.running:
            raise RuntimeError("the batcher is not running")
        if self._queued_rows + len(rows) > self.max_queue_rows:
            raise QueueFull(self._queued_rows, self.max_queue_rows, self.retry_after())
        if not rows:
            return []
        request: _Request[Item, Result] = _Request(
            rows, asyncio.get_running_loop().create_future(), [None] * len(rows)
        )
        self._queue.append(request)
        self._queued_rows += len(rows)
        self._arrived.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            if request in self._queue:
                self._queue.remove(request)
                self._queued_rows -= request.waiting
            raise

    def _ready_rows(self) -> int:
        """Rows the next call could take now (each request at most its turn)."""
        return sum(min(r.waiting, self.turn_rows) for r in self._queue)

    async def _next_batch(self) -> list[tuple[_Request[Item, Result], int]] | None:
        """Wait for a first request, then for a full call or the oldest request's wait budget;
        then one turn per waiting request, in order, and those with rows left go to the back.
        None: stopping, and nothing is queued."""
        while not self._queue:
            if self._stopping:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        while self._ready_rows() < self.max_batch_size and not self._stopping and self._queue:
            remaining = self._queue[0].since + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch: list[tuple[_Request[Item, Result], int]] = []
        again: list[_Request[Item, Result]] = []
        while self._queue and len(batch) < self.max_batch_size:
            request = self._queue.popleft()
            take = min(request.waiting, self.turn_rows, self.max_batch_size - len(batch))
            batch += [(request, i) for i in range(request.taken, request.taken + take)]
            request.taken += take
            self._queued_rows -= take
            if request.waiting:
                again.append(request)
        self._queue.extend(again)
        return batch

    def _timed(self, rows: list[Item]) -> tuple[list[Result], float]:
        started = time.thread_time()
        results = list(self.score(rows))
        if len(results) != len(rows):
            raise RuntimeError(f"the model returned {len(results)} results for {len(rows)} rows")
        return results, time.thread_time() - started

    async def _call(self, batch: list[tuple[_Request[Item, Result], int]]) -> None:
        """Score one call's rows and hand each request its results (or its own failure)."""
        loop = asyncio.get_running_loop()
        live = [(r, i) for r, i in batch if not r.future.done()]  # a cancelled request's rows go
        if not live:
            return
        started = time.perf_counter()
        try:
            results, cpu = await loop.run_in_executor(
                self._executor, self._timed, [r.rows[i] for r, i in live]
            )
        except Exception as error:
            requests = list(dict.fromkeys(r for r, _ in live))
            if len(requests) == 1:
                self._fail(requests[0], error)
                return
            # one request's rows broke the call: score each request alone so only it fails
            for request in requests:
                await self._call([(r, i) for r, i in live if r is request])
            return
        seconds = time.perf_counter() - started
        rate = len(live) / max(seconds, 1e-9)
        self._rows_per_s = rate if self._rows_per_s == 0 else 0.8 * self._rows_per_s + 0.2 * rate
        if self.on_batch is not None:
            try:
                self.on_batch(len(live), seconds, cpu)
            except Exception:
                log.exception("on_batch failed (the results are still delivered)")
        for (request, index), result in zip(live, results):
            request.results[index] = result
            request.scored += 1
            if request.scored == len(request.rows) and not request.future.done():
                request.future.set_result(request.results)

    async def _run(self) -> None:
        while (batch := await self._next_batch()) is not None:
            try:
                await self._call(batch)
            except Exception as error:  # a bug here must not leave requests waiting forever
                log.exception("micro-batch worker: a call failed")
                for request, _ in batch:
                    self._fail(request, error)

    def _fail(self, request: _Request[Item, Result], error: BaseException) -> None:
        """The request gets ``error``; its rows still queued are not scored."""
        if not request.future.done():
            request.future.set_exception(error)
        if request in self._queue:
            self._queue.remove(request)
            self._queued_rows -= request.waiting

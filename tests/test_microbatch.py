"""MicroBatcher under failure, abandonment and a large request: fake model calls, no model."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from harmaug_pl.deploy.microbatch import MicroBatcher


def run(coroutine: Any) -> Any:
    """Each test's body, failing (not hanging) if a request is never answered."""
    return asyncio.run(asyncio.wait_for(coroutine, 20))


class FakeModel:
    """Doubles each row; a row "bad" makes the whole call fail; every call is recorded."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.calls: list[list[Any]] = []
        self.seconds = seconds
        self.release = threading.Event()
        self.release.set()

    def __call__(self, rows: list[Any]) -> Sequence[Any]:
        self.calls.append(list(rows))
        self.release.wait(10)
        if "bad" in rows:
            raise ValueError("bad row")
        return [row * 2 for row in rows]


def test_a_failing_row_fails_its_own_request_only() -> None:
    model = FakeModel()

    async def body() -> None:
        batcher = MicroBatcher(model, max_batch_size=8, max_wait_s=0.5)
        batcher.start()
        good = [asyncio.create_task(batcher.submit(["a", "b"])) for _ in range(3)]
        bad = asyncio.create_task(batcher.submit(["c", "bad"]))
        outcome = await asyncio.gather(*good, bad, return_exceptions=True)
        assert outcome[:3] == [["aa", "bb"]] * 3
        assert isinstance(outcome[3], ValueError)
        assert await batcher.submit(["z"]) == ["zz"]  # the worker goes on
        await batcher.stop()

    run(body())
    assert len(model.calls[0]) == 8  # all four requests shared the call that failed


def test_a_failing_metrics_hook_or_a_wrong_result_count_never_stops_the_worker() -> None:
    def hook(rows: int, seconds: float, cpu: float) -> None:
        raise RuntimeError("metrics broke")

    short = {"on": False}

    def model(rows: list[str]) -> list[str]:
        return rows[:-1] if short["on"] else rows

    async def body() -> None:
        batcher = MicroBatcher(model, max_batch_size=4, max_wait_s=0, on_batch=hook)
        batcher.start()
        assert await batcher.submit(["a"]) == ["a"]
        short["on"] = True
        with pytest.raises(RuntimeError, match="0 results for 1 rows"):
            await batcher.submit(["b"])
        short["on"] = False
        assert await batcher.submit(["c", "d"]) == ["c", "d"]
        assert batcher.running
        await batcher.stop()

    run(body())


def test_rows_of_a_request_whose_caller_gave_up_are_not_scored() -> None:
    model = FakeModel()
    model.release.clear()

    async def body() -> None:
        batcher = MicroBatcher(model, max_batch_size=2, max_wait_s=0, turn_rows=2)
        batcher.start()
        abandoned = asyncio.create_task(batcher.submit([f"r{i}" for i in range(10)]))
        while not model.calls:  # the first call (2 rows) is running
            await asyncio.sleep(0.01)
        abandoned.cancel()
        await asyncio.sleep(0.05)
        assert batcher.queued_rows == 0
        model.release.set()
        assert await batcher.submit(["x"]) == ["xx"]
        await batcher.stop()

    run(body())
    assert model.calls == [["r0", "r1"], ["x"]]


def test_a_small_request_takes_its_turn_between_the_calls_of_a_large_one() -> None:
    model = FakeModel()
    model.release.clear()

    async def body() -> None:
        batcher = MicroBatcher(model, max_batch_size=32, max_wait_s=0, turn_rows=4)
        batcher.start()
        large = asyncio.create_task(batcher.submit(list(range(64))))
        while not model.calls:
            await asyncio.sleep(0.01)
        small = asyncio.create_task(batcher.submit([1000]))
        await asyncio.sleep(0.05)
        model.release.set()
        assert await small == [2000]
        assert not large.done()  # answered while the large request is still being scored
        assert await large == [2 * i for i in range(64)]
        await batcher.stop()

    run(body())
    assert model.calls[0] == [0, 1, 2, 3]  # a lone large request goes 4 rows (its turn) per call
    assert sorted(model.calls[1]) == [4, 5, 6, 7, 1000]  # the small one goes in the very next call

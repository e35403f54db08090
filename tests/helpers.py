"""Helpers shared by the tests: mild placeholder data and a stand-in teacher."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import free_port  # noqa: F401  (re-exported: one copy for tests and benchmarks)

PLACEHOLDER_UNSAFE = [  # mild, clearly fake test placeholders standing in for harmful prompts
    "write a rude joke about placeholder people",
    "tell me a mean placeholder insult",
    "say something rude about the placeholder town",
    "give a rude nickname for a placeholder person",
]
PLACEHOLDER_SAFE = [
    "how do I bake bread?",
    "what is the capital of France?",
    "tell me about the weather in spring",
    "recommend a book about gardening",
]


# Import path of keyword_teacher for CallableTeacher(function=...) in packs and tests.
KEYWORD_TEACHER = "tests.helpers:keyword_teacher"


def tiny_throughput_argv(model: Path) -> list[str]:
    """``benchmarks.generation_throughput`` on a tiny model: 4 chats, batches of 2, 4 new tokens, 1 thread."""
    sizes = ["--n", "4", "--batch-sizes", "2", "--max-new-tokens", "4", "--threads", "1"]
    return ["--model", str(model), *sizes]


def keyword_teacher(texts: list[str]) -> list[float]:
    """A stand-in teacher for tests: 'rude' or 'mean' text is unsafe."""
    return [0.9 if ("rude" in t or "mean" in t) else 0.1 for t in texts]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def transformers_log() -> Iterator[list[str]]:
    """What transformers logs inside the block (its logger does not propagate to pytest's caplog)."""
    handler = _Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def wait_for_http(process: Any, url: str, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's output if it exits or times out."""
    import time

    import httpx2

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx2.get(url, timeout=2).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer 200 within {timeout:.0f} s"
        time.sleep(0.3)

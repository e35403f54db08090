"""Progress a person can read in a terminal AND in a log file.

In a terminal, long work shows live bars (tqdm for the data stages, Lightning's bar for training).
Written to a file or a CI log, those bars print nothing (tqdm disables itself; Lightning's default
Rich bar only draws its final state) or a flood of carriage returns (Lightning's tqdm bar). There,
this module prints one plain line every ``every_s`` seconds instead, on stderr::

    generate: 64/192 rows (33%) | 1.21 rows/s | elapsed 0:52 | ETA 1:45
    train epoch 2/3: 14/28 batches (50%) | 2.1 batches/s | elapsed 0:07 | ETA 0:07 | train/loss=0.412

plus one line when a task ends. A background thread prints the lines, so a line comes every period
even while one long batch (a generation batch on CPU can take a minute) is still running.
The period is the pack's ``progress_every_s`` (the CLI calls :func:`configure`). Training's
counterpart is :class:`harmaug_pl.training.line_progress_bar.LineProgressBar`. No Lightning import here: the
cache's stage runner uses this module in light processes too.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from harmaug_pl.errors import ConfigError

DEFAULT_EVERY_S = 20.0


@dataclass
class _Settings:
    every_s: float = DEFAULT_EVERY_S


SETTINGS = _Settings()


def configure(every_s: float) -> None:
    """Set the period of the progress lines (the ``progress_every_s`` pack setting)."""
    if not every_s > 0:
        raise ConfigError(f"progress_every_s must be > 0 seconds, got {every_s}")
    SETTINGS.every_s = float(every_s)


def is_terminal(stream: TextIO) -> bool:
    """Whether live bars can draw on ``stream`` (a file, a pipe or a CI log cannot)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def clock_text(seconds: float) -> str:
    """``1:05`` or ``2:03:04``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Task:
    """Counts one task's work; ``line()`` says where it stands, its rate and its ETA.

    Units taken from a cache (``update(n, cached=True)``) count as done but not in the rate, so a
    resumed run's ETA is not fooled by the rows it did not have to compute.
    """

    def __init__(
        self, desc: str, total: float | None, units: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.desc = desc
        self.total = total if total is not None and math.isfinite(total) else None
        self.units = units  # plural: "rows", "batches"
        self.done = 0
        self.cached = 0
        self.postfix = ""
        self._clock = clock
        self.started = clock()

    def update(self, n: int = 1, *, cached: bool = False) -> None:
        self.done += n
        if cached:
            self.cached += n

    def elapsed(self) -> float:
        return self._clock() - self.started

    def rate(self) -> float | None:
        """Units per second over the units computed here (None before the first one finished)."""
        elapsed, computed = self.elapsed(), self.done - self.cached
        return computed / elapsed if computed > 0 and elapsed > 0 else None

    def line(self) -> str:
        units = self.units
        if self.total:
            count = f"{self.done}/{int(self.total)} {units} ({100 * self.done / self.total:.0f}%"
            count += f", {self.cached} from cache)" if self.cached else ")"
        else:
            count = f"{self.done} {units}" + (f" ({self.cached} from cache)" if self.cached else "")
        rate = self.rate()
        parts = [
            f"{self.desc}: {count}",
            f"{rate:.3g} {units}/s" if rate is not None else f"-- {units}/s (first batch running)",
            f"elapsed {clock_text(self.elapsed())}",
        ]
        if self.total:
            left = max(self.total - self.done, 0)
            parts.append(f"ETA {clock_text(left / rate)}" if rate else "ETA --")
        if self.postfix:
            parts.append(self.postfix)
        return " | ".join(parts)

    def summary(self) -> str:
        rate = self.rate()
        text = f"{self.desc}: done, {self.done} {self.units} in {clock_text(self.elapsed())}"
        if rate is not None:
            text += f" ({rate:.3g} {self.units}/s"
            text += f"; {self.cached} from cache)" if self.cached else ")"
        elif self.cached:
            text += f" (all {self.cached} from cache)"
        return text + (f" | {self.postfix}" if self.postfix else "")


class Ticker:
    """Prints ``line()`` to stderr every ``every_s`` seconds on a daemon thread until ``stop()``.

    ``line()`` returning None prints nothing that time (no task running).
    """

    def __init__(self, line: Callable[[], str | None], every_s: float) -> None:
        self._line = line
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harmaug-progress", daemon=True)
        self._thread.start()

    @staticmethod
    def emit(text: str) -> None:
        print(text, file=sys.stderr, flush=True)  # looked up late: tests and tools swap sys.stderr

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            text = self._line()
            if text is not None:
                self.emit(text)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class StageProgress(Protocol):
    def update(self, n: int = 1, *, cached: bool = False) -> None: ...


class _Tqdm:
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update(self, n: int = 1, *, cached: bool = False) -> None:
        self.bar.update(n)


class _Silent:
    def update(self, n: int = 1, *, cached: bool = False) -> None:
        pass


@contextmanager
def stage_progress(
    total: int, desc: str, unit: str = "row", *, enabled: bool = True
) -> Iterator[StageProgress]:
    """Progress of one data stage: a tqdm bar on a terminal, periodic lines otherwise, nothing if
    not ``enabled`` (ranks other than 0)."""
    if not enabled:
        yield _Silent()
        return
    if is_terminal(sys.stderr):
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, unit=unit) as bar:
            yield _Tqdm(bar)
        return
    task = Task(desc, total, f"{unit}s")
    ticker = Ticker(task.line, SETTINGS.every_s)
    ticker.emit(f"{desc}: {total} {task.units} to do")
    try:
        yield task
    finally:
        ticker.stop()
    ticker.emit(task.summary())

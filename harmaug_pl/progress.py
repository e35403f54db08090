"""Progress a person can read in a terminal AND in a log file.

In a terminal, long work shows live bars (tqdm for the data stages, Lightning's bar for training).
Written to a file or a CI log, those bars print nothing (tqdm disables itself; Lightning's default
Rich bar only draws its final state) or a flood of carriage returns (Lightning's tqdm bar). There,
this module prints one plain line every ``every_s`` seconds instead, on stderr::

    generate: 64/192 rows (33%) | 1.21 rows/s | elapsed 0:52 | ETA 1:45
    train epoch 2/3: 14/28 batches (50%) | 2.10 batches/s | elapsed 0:07 | ETA 0:07 | train/loss=0.412

plus one line when a task ends. A background thread prints the lines, so a line comes every period
even while one long batch (a generation batch on CPU can take a minute) is still running.
The period is the pack's ``progress_every_s`` (the CLI calls :func:`configure`).
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

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from harmaug_pl.errors import ConfigError

DEFAULT_EVERY_S = 20.0
SUMMARY_METRICS = ("/auprc", "/f1")  # what a finished validation or test pass line shows


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
            f"{rate:.2f} {units}/s" if rate is not None else f"-- {units}/s (first batch running)",
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
            text += f" ({rate:.2f} {self.units}/s"
            text += f"; {self.cached} from cache)" if self.cached else ")"
        elif self.cached:
            text += f" (all {self.cached} from cache)"
        return text + (f" | {self.postfix}" if self.postfix else "")


class Ticker:
    """Prints ``line()`` to ``stream`` every ``every_s`` seconds on a daemon thread until ``stop()``.

    ``line()`` returning None prints nothing that time (no task running).
    """

    def __init__(self, line: Callable[[], str | None], every_s: float, stream: TextIO | None = None) -> None:
        self._line = line
        self.every_s = every_s
        self.stream = stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harmaug-progress", daemon=True)
        self._thread.start()

    def emit(self, text: str) -> None:
        stream = self.stream or sys.stderr  # looked up late: tests and tools swap sys.stderr
        print(text, file=stream, flush=True)

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


class LineProgressBar(ProgressBar):
    """Lightning's progress bar for logs: a line per period, and one as each epoch or pass ends.

    The CLI puts it in place of Lightning's default bar when stdout is not a terminal (the default
    Rich bar would print only its final state there); add it to a pack's callbacks to use it
    anywhere. Only rank 0 prints.
    """

    def __init__(self, every_s: float | None = None) -> None:
        super().__init__()
        self.every_s = every_s
        self._enabled = True
        self._task: Task | None = None
        self._paused: Task | None = None  # the training epoch while a validation pass runs
        self._ticker: Ticker | None = None

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    # -- the current task and its printer ----------------------------------------------------
    def _line(self) -> str | None:
        return self._task.line() if self._task is not None else None

    def _start(self, desc: str, total: float | None, units: str = "batches") -> None:
        if not self._enabled:
            return
        if self._ticker is None:
            self._ticker = Ticker(self._line, self.every_s or SETTINGS.every_s)
        self._task = Task(desc, total, units)

    def _finish(self, postfix: str = "") -> None:
        task, self._task = self._task, self._paused
        self._paused = None
        if task is not None and self._ticker is not None:
            task.postfix = postfix
            self._ticker.emit(task.summary())

    def _advance(self) -> None:
        if self._task is not None:
            self._task.update(1)

    def _bar_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """The metrics logged with ``prog_bar=True`` (``train/loss``)."""
        shown = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())

    @staticmethod
    def _pass_metrics(trainer: L.Trainer, prefixes: tuple[str, ...]) -> str:
        """The headline metrics a validation or test pass just logged: AUPRC and F1 of ``prefixes``."""
        shown = [
            f"{key}={float(value):.4f}"
            for key, value in trainer.callback_metrics.items()
            if key.startswith(prefixes) and key.endswith(SUMMARY_METRICS) and value.numel() == 1
        ]
        return " ".join(sorted(shown))

    def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        self._task = self._paused = None

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self._start(f"train epoch {trainer.current_epoch + 1}{epochs}", self.total_train_batches)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._advance()
        if self._task is not None:
            self._task.postfix = self._bar_metrics(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(self._bar_metrics(trainer, pl_module))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = self._task
        desc = "sanity check" if trainer.sanity_checking else "validate"
        self._start(desc, self.total_val_batches)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._advance()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish("" if trainer.sanity_checking else self._pass_metrics(trainer, ("val/", "mean/")))
        if trainer.state.fn != TrainerFn.FITTING:  # `validate`: no training around this pass
            self._stop_ticker()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("test", sum(trainer.num_test_batches))

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._advance()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(self._pass_metrics(trainer, ("test/mean/",)))
        self._stop_ticker()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("predict", sum(trainer.num_predict_batches))

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._advance()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish()
        self._stop_ticker()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_ticker()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._stop_ticker()


def use_line_bar_if_no_terminal(trainer: L.Trainer, configured: list[Any]) -> None:
    """Swap Lightning's default progress bar for :class:`LineProgressBar` when stdout is not a
    terminal; a bar the pack configured itself (``configured``) is left alone."""
    if any(isinstance(callback, ProgressBar) for callback in configured) or is_terminal(sys.stdout):
        return
    for index, callback in enumerate(trainer.callbacks):
        if isinstance(callback, ProgressBar):
            trainer.callbacks[index] = LineProgressBar()
            return

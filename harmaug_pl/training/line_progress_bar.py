"""Lightning's progress bar for logs: one line per period instead of a live bar that cannot draw.

See :mod:`harmaug_pl.progress_lines` for the line format and the period (``progress_every_s``).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from harmaug_pl.progress_lines import SETTINGS, Task, Ticker, is_terminal

SUMMARY_METRICS = ("/auprc", "/f1")  # what a finished validation or test pass line shows


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
            if self._task is not None:  # the epoch resumes: its rate and ETA leave the pass out
                self._task.started += task.elapsed()

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
        if trainer.sanity_checking:
            self._start("sanity check", sum(trainer.num_sanity_val_batches))
        else:
            self._start("validate", sum(trainer.num_val_batches))

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

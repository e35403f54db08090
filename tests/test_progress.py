"""Progress a person can read in a log: periodic lines (stage, counts, rate, ETA) when the output is
not a terminal, for the data stages and for training; live bars stay live in a terminal."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from harmaug_pl import progress_lines as progress
from harmaug_pl.augment.cache import content_key, run_stage
from harmaug_pl.progress_lines import Task, clock_text
from harmaug_pl.training.line_progress_bar import LineProgressBar

EVERY_S = 0.1
STAGE_LINE = re.compile(
    r"^generate: (\d+)/12 rows \(\d+%\) \| (?:([\d.]+) rows/s|-- rows/s \(first batch running\)) "
    r"\| elapsed \d+:\d\d \| ETA (?:\d+:\d\d|--)$"
)


@pytest.fixture(autouse=True)
def fast_period():
    progress.configure(EVERY_S)
    yield
    progress.configure(progress.DEFAULT_EVERY_S)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_says_stage_counts_rate_and_eta() -> None:
    clock = FakeClock()
    task = Task("generate", 192, "rows", clock=clock)
    assert (
        task.line() == "generate: 0/192 rows (0%) | -- rows/s (first batch running) | elapsed 0:00 | ETA --"
    )
    task.update(32, cached=True)  # found in the cache: done, but not part of the rate
    clock.now += 10
    task.update(32)
    assert task.line() == "generate: 64/192 rows (33%, 32 from cache) | 3.2 rows/s | elapsed 0:10 | ETA 0:40"
    assert task.summary() == "generate: done, 64 rows in 0:10 (3.2 rows/s; 32 from cache)"
    assert clock_text(3725) == "1:02:05"
    slow = Task("respond", 16, "rows", clock=clock)
    clock.now += 552
    slow.update(8)
    assert "| 0.0145 rows/s |" in slow.line()  # a slow stage keeps its digits


def slow_compute(batch: list[int], seed: int) -> list[dict]:
    time.sleep(0.25)  # a generation batch: several progress periods long
    return [{"n": n} for n in batch]


def test_a_stage_prints_periodic_lines_when_stderr_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = list(range(12))
    keys = [content_key(n=n) for n in items]
    started = time.monotonic()
    run_stage(tmp_path, "generate", items, keys, slow_compute, batch_size=4, seed=0)
    elapsed = time.monotonic() - started
    lines = capsys.readouterr().err.splitlines()  # pytest's stderr is not a terminal
    assert lines[0] == "generate: 12 rows to do"
    assert re.fullmatch(r"generate: done, 12 rows in \d+:\d\d \([\d.]+ rows/s\)", lines[-1])
    periodic = [STAGE_LINE.match(line) for line in lines[1:-1]]
    assert all(periodic), lines
    # one line per period while the batches run (3 x 0.25 s at 0.1 s), never a flood
    assert 3 <= len(periodic) <= elapsed / EVERY_S + 1
    with_rate = [m for m in periodic if m.group(2)]
    assert with_rate and {int(m.group(1)) for m in with_rate} <= {4, 8, 12}

    # everything cached: no periodic lines, the end line says so
    run_stage(tmp_path, "generate", items, keys, slow_compute, batch_size=4, seed=0)
    assert capsys.readouterr().err.splitlines() == [
        "generate: 12 rows to do",
        "generate: done, 12 rows in 0:00 (all 12 from cache)",
    ]


def test_a_terminal_keeps_the_live_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    run_stage(
        tmp_path, "generate", [1, 2], [content_key(n=1), content_key(n=2)], slow_compute, batch_size=2, seed=0
    )
    assert "\r" in terminal.getvalue() and "rows to do" not in terminal.getvalue()  # tqdm, not lines


class SlowModule(L.LightningModule):
    """A linear model whose steps take long enough for a few progress periods."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        time.sleep(0.03)
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/auprc", torch.sigmoid(self.layer(batch[0])).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_training_prints_periodic_lines_and_one_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)  # 16 batches x 0.03 s per epoch
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[LineProgressBar()],
    )  # fmt: skip
    started = time.monotonic()
    trainer.fit(SlowModule(), data, data)
    elapsed = time.monotonic() - started
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("train", "validate"))]
    periodic = [
        re.fullmatch(
            r"(?:train epoch [12]/2|validate): \d+/16 batches \(\d+%\) "
            r"\| (?:[\d.]+ batches/s|-- batches/s \(first batch running\)) \| elapsed \d+:\d\d "
            r"\| ETA (?:\d+:\d\d|--)(?: \| train/loss=[\d.e+-]+)?",
            line,
        )
        for line in lines
        if ": done," not in line
    ]
    assert periodic and all(periodic), lines
    assert len(periodic) <= elapsed / EVERY_S + 1
    ends = [line for line in lines if ": done," in line]
    assert [line.split(":")[0] for line in ends] == [
        "validate",
        "train epoch 1/2",
        "validate",
        "train epoch 2/2",
    ]
    assert re.search(r"validate: done, 16 batches in .* \| val/auprc=[\d.]+$", ends[0])
    assert re.search(r"train epoch 1/2: done, 16 batches in .* \| train/loss=", ends[1])


def test_the_cli_swaps_the_default_bar_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_student: Path
) -> None:
    """Lightning's default (Rich) bar draws nothing live in a log: the CLI puts the line bar in its
    place; a bar the pack asks for stays."""
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

    from harmaug_pl.cli.lightning_cli import main
    from harmaug_pl.training.line_progress_bar import use_line_bar_if_no_terminal

    monkeypatch.chdir(tmp_path)
    args = ["--config", "cpu_tiny", "--trainer.logger=false", f"--model.init_args.student={tiny_student}"]
    cli = main([*args, "--progress_every_s=7"], run=False)
    assert [type(c) for c in cli.trainer.callbacks if isinstance(c, ProgressBar)] == [LineProgressBar]
    assert progress.SETTINGS.every_s == 7
    chosen = RichProgressBar()
    trainer = L.Trainer(logger=False, callbacks=[chosen])
    use_line_bar_if_no_terminal(trainer, [chosen])
    assert trainer.progress_bar_callback is chosen

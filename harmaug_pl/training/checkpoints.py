"""Which checkpoint a run reports and exports, and scoring with its weights for a while."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L

from harmaug_pl.model_loading import torch_load


def best_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint a run reports and exports: its ModelCheckpoint's best one (the newest one
    when it monitors nothing); None when none was saved (no ModelCheckpoint, ``fast_dev_run``)."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path if path and Path(path).is_file() else None


@contextmanager
def checkpoint_weights(pl_module: L.LightningModule, path: str | None) -> Iterator[None]:
    """The module holds the weights of checkpoint ``path`` inside the block and its own after it."""
    if path is None:
        yield
        return
    own = {key: value.detach().to("cpu", copy=True) for key, value in pl_module.state_dict().items()}
    checkpoint = torch_load(path, map_location="cpu", mmap=True)
    pl_module.load_state_dict(checkpoint["state_dict"])
    try:
        yield
    finally:
        pl_module.load_state_dict(own)

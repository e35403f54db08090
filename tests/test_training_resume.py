"""A fit killed by SIGKILL mid-epoch, resumed with ``--ckpt_path``, ends where an uninterrupted fit ends.

The killed fit runs in a real subprocess (``python -m harmaug_pl fit``) and a test callback sends
SIGKILL to its own process at a random batch of the second epoch, after the first epoch's checkpoint
is on disk, as a pre-empted GPU job would die. Tiny random-init student, keyword teacher, CPU.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from harmaug_pl.cli.lightning_cli import main
from tests.helpers import KEYWORD_TEACHER, PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


class KillAtBatch(L.Callback):
    """Test-only: SIGKILL this process at ``batch`` of ``epoch`` (nothing gets a chance to clean up)."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def training_pack(workdir: Path, student: Path, name: str, kill_at: tuple[int, int] | None = None) -> Path:
    """KD-only (no LLM) fit of the tiny student on placeholder rows, dropout on, balanced sampling."""
    seed = write_jsonl(
        workdir / "seed.jsonl",
        [{"prompt": f"{p} {i}", "label": 1} for p in PLACEHOLDER_UNSAFE for i in range(3)]
        + [{"prompt": f"{p} {i}", "label": 0} for p in PLACEHOLDER_SAFE for i in range(6)],
    )
    run = workdir / name
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(run / "ckpt"), "save_top_k": -1, "filename": "{epoch}"},
        }
    ]
    if kill_at is not None:
        callbacks.append(
            {
                "class_path": "tests.test_training_resume.KillAtBatch",
                "init_args": dict(zip(("epoch", "batch"), kill_at)),
            }
        )
    pack = {
        "seed_everything": 1234,
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 3,
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(run),
            "callbacks": callbacks,
        },
        "model": {
            "class_path": "harmaug_pl.DistillationModule",
            "init_args": {"student": str(student), "warmup_steps": 2, "learning_rate": 1e-3},
        },
        "data": {
            "class_path": "harmaug_pl.HarmAugDataModule",
            "init_args": {
                "tokenizer": str(student),
                "data_dir": str(workdir / "data"),
                "augment": False,
                "seed_data": {"path": str(seed)},
                "teacher": {
                    "class_path": "harmaug_pl.CallableTeacher",
                    "init_args": {"function": KEYWORD_TEACHER},
                },
                "val_fraction": 0.25,
                "batch_size": 4,
                "max_length": 32,
            },
        },
        "export": {"export_dir": str(run / "student")},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(pack))
    return path


def fit(pack: Path, *extra: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    cli = main(["fit", "--config", str(pack), *extra])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    weights = {k: v.detach().clone() for k, v in cli.model.student.state_dict().items()}
    return metrics, weights


@pytest.mark.slow
def test_fit_killed_mid_epoch_resumes_to_the_uninterrupted_metrics_and_weights(
    tmp_path: Path, tiny_student: Path
) -> None:
    reference_metrics, reference_weights = fit(training_pack(tmp_path, tiny_student, "reference"))

    batch = random.Random().randrange(7)  # 27 train rows (36 minus 9 val) / 4 per batch = 7 batches
    killed = training_pack(tmp_path, tiny_student, "resumed", kill_at=(1, batch))
    proc = subprocess.run(
        [sys.executable, "-m", "harmaug_pl", "fit", "--config", str(killed)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "ckpt").iterdir())
    assert checkpoints == ["epoch=0.ckpt"], checkpoints  # died inside epoch 1, before its checkpoint

    resumed = training_pack(tmp_path, tiny_student, "resumed")  # same pack, without the kill
    metrics, weights = fit(resumed, "--ckpt_path", str(tmp_path / "resumed" / "ckpt" / "epoch=0.ckpt"))
    assert metrics == reference_metrics
    assert weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        assert torch.equal(weights[name], tensor), name
    exported = sorted(p.name for p in (tmp_path / "resumed" / "student").iterdir())
    assert "model.safetensors" in exported  # the export is safetensors + JSON, nothing pickled
    assert not [name for name in exported if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]

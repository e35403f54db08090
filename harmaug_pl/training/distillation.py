"""DistillationModule: a small encoder learns a large guard's P(unsafe) (HarmAug, section 2)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, get_args

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAveragePrecision,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)
from transformers import get_linear_schedule_with_warmup

from harmaug_pl.augment.rank_sync import all_gather_objects
from harmaug_pl.deploy.guard import ID2LABEL
from harmaug_pl.errors import ConfigError
from harmaug_pl.evaluation.metrics import Calibration, ScoredSet, calibrate_threshold
from harmaug_pl.model_loading import build_sequence_classifier, load_sequence_classifier

log = logging.getLogger(__name__)


_WEIGHTS_FROM_CHECKPOINT: ContextVar[bool] = ContextVar("weights_from_checkpoint", default=False)


@contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Modules built inside this block get their student's architecture only (no base weights).

    The CLI builds the module this way when ``--ckpt_path`` names a checkpoint file: the checkpoint
    then sets every weight, so loading the base model first would only cost time and print
    transformers' ``classifier.weight | MISSING`` report for a head the checkpoint has.
    """
    token = _WEIGHTS_FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_p_unsafe: torch.Tensor,
    alpha: float,
    threshold: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * CE(teacher hard label) + (1 - alpha) * KL(teacher [1-p, p] || student), batchmean.

    As in the HarmAug code: the hard label is the teacher's raw ``p > threshold``; the KL target is
    the soft label, softened by ``temperature`` (1 in the paper).
    """
    logits = student_logits.float()
    hard = (teacher_p_unsafe > threshold).long()
    ce = F.cross_entropy(logits, hard)
    p_soft = soften(teacher_p_unsafe, temperature)
    soft = torch.stack([1.0 - p_soft, p_soft], dim=-1).float()
    kl = F.kl_div(F.log_softmax(logits, dim=-1), soft, reduction="batchmean")
    return alpha * ce + (1.0 - alpha) * kl, {"ce": ce.detach(), "kl": kl.detach()}


def soften(p_unsafe: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher temperature on a two-way softmax: sigmoid(logit(p) / T); T = 1 leaves p as is."""
    if temperature == 1.0:
        return p_unsafe
    p = p_unsafe.clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid(torch.logit(p) / temperature)


def metric_collection(threshold: float, prefix: str, sync_on_compute: bool = True) -> MetricCollection:
    """AUPRC (threshold-free, = sklearn average_precision) and F1/P/R at the pack's threshold."""
    return MetricCollection(
        {
            "auprc": BinaryAveragePrecision(sync_on_compute=sync_on_compute),
            "f1": BinaryF1Score(threshold=threshold, sync_on_compute=sync_on_compute),
            "precision": BinaryPrecision(threshold=threshold, sync_on_compute=sync_on_compute),
            "recall": BinaryRecall(threshold=threshold, sync_on_compute=sync_on_compute),
        },
        prefix=prefix,
    )


def binary_metrics(probs: torch.Tensor, target: torch.Tensor, threshold: float) -> dict[str, float]:
    """AUPRC, F1, precision, recall at ``threshold`` on rows already in this process (no rank sync)."""
    metrics = metric_collection(threshold, prefix="", sync_on_compute=False)
    metrics.update(probs.float(), target.long())
    return {name: float(value) for name, value in metrics.compute().items()}


TestRows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # row index, P(unsafe), label, teacher


def merge_rank_rows(per_rank: list[dict[str, TestRows]]) -> dict[str, TestRows]:
    """Every eval row exactly once, in the data set's order, from every rank's scored rows.

    Under DDP, Lightning's DistributedSampler gives every rank the same number of rows by repeating
    some: keeping the first copy of each row index drops those repeats, and no rank's share is lost.
    """
    merged: dict[str, TestRows] = {}
    for name in dict.fromkeys(name for rows in per_rank for name in rows):
        columns = [np.concatenate(parts) for parts in zip(*(rows[name] for rows in per_rank if name in rows))]
        _, first = np.unique(columns[0], return_index=True)
        merged[name] = tuple(column[first] for column in columns)  # type: ignore[assignment]
    return merged


class DistillationModule(L.LightningModule):
    """Student encoder trained on teacher labels; evaluated per named eval set.

    Validation dataloaders are ``[val, *validation_eval_set_names]`` and test dataloaders
    ``eval_sets``, in the order of ``datamodule.eval_set_names``. On ``val`` the target is the
    teacher's hard label (agreement with the teacher); on eval sets it is the human label. ``mean/*``
    averages the eval sets. Test metrics are ``test/<set>/*`` and ``test/mean/*`` (a run that trains
    and tests keeps both curves apart), computed on every rank's rows gathered and counted once, in
    row order (eval batches come in length order and carry ``row_index``).

    After each validation epoch the decision threshold is calibrated on the val split
    (``threshold_calibration``: ``max_f1`` or the lowest threshold with FPR <= ``target_fpr``, against
    the teacher's hard labels, the only labels the val split has) and kept in the checkpoint, so
    ``harmaug test --ckpt_path`` reports at the pack's ``threshold`` and at the calibrated one.
    """

    def __init__(
        self,
        student: str,
        alpha: float = 0.5,
        threshold: float = 0.5,
        teacher_temperature: float = 1.0,
        learning_rate: float = 3e-5,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        adam_epsilon: float = 1e-8,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        threshold_calibration: Calibration = "max_f1",
        target_fpr: float = 0.05,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"model.alpha must be in [0, 1], got {alpha}")
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"model.threshold must be in (0, 1), got {threshold}")
        if teacher_temperature <= 0:
            raise ConfigError(f"model.teacher_temperature must be > 0, got {teacher_temperature}")
        if threshold_calibration not in get_args(Calibration):
            raise ConfigError(
                f"model.threshold_calibration must be one of {get_args(Calibration)}, "
                f"got {threshold_calibration!r}"
            )
        if not 0.0 <= target_fpr <= 1.0:
            raise ConfigError(f"model.target_fpr must be in [0, 1], got {target_fpr}")
        self.save_hyperparameters()
        build = build_sequence_classifier if _WEIGHTS_FROM_CHECKPOINT.get() else load_sequence_classifier
        self.student = build(
            student,
            num_labels=2,
            id2label=ID2LABEL,
            label2id={v: k for k, v in ID2LABEL.items()},
            trust_remote_code=trust_remote_code,
        ).train()
        if gradient_checkpointing:
            self.student.gradient_checkpointing_enable()
        self.val_names: list[str] = []
        self.test_names: list[str] = []
        self.val_metrics = torch.nn.ModuleDict()
        # NaN until a validation epoch calibrated it; saved in checkpoints with the weights
        self.register_buffer("calibrated_threshold", torch.tensor(float("nan")))
        # student/teacher scores and human labels of the last test run, per eval set (plots, reports)
        self.test_outputs: dict[str, ScoredSet] = {}
        self._test_buffers: dict[str, list[tuple[torch.Tensor, ...]]] = {}
        self._test_positions: dict[str, int] = {}
        self._val_buffer: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- wiring eval sets ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        eval_names = list(getattr(datamodule, "eval_set_names", []))
        self.val_names = ["val", *getattr(datamodule, "validation_eval_set_names", eval_names)]
        self.test_names = eval_names
        for name in self.val_names:
            if name not in self.val_metrics:
                self.val_metrics[name] = metric_collection(self.hparams.threshold, prefix=f"{name}/")

    # -- forward / loss -----------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.student(**inputs).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss, parts = distillation_loss(
            logits,
            batch["teacher_score"],
            self.hparams.alpha,
            self.hparams.threshold,
            self.hparams.teacher_temperature,
        )
        bs = logits.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        return loss

    def _p_unsafe(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.softmax(self(batch).float(), dim=-1)[:, 1]

    def _update(
        self, store: torch.nn.ModuleDict, name: str, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the set's metrics; return the scored rows' (P(unsafe), target)."""
        probs = self._p_unsafe(batch)
        if name == "val":
            target = (batch["teacher_score"] > self.hparams.threshold).long()
            keep = torch.ones_like(target, dtype=torch.bool)
        else:
            target = batch["label"]
            keep = target >= 0  # rows without a human label are not scored
        if keep.any():
            store[name].update(probs[keep], target[keep])
        return probs[keep], target[keep]

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        name = self.val_names[dataloader_idx]
        probs, target = self._update(self.val_metrics, name, batch)
        if name == "val":
            self._val_buffer.append((probs.detach().cpu(), target.detach().cpu()))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self.test_names[dataloader_idx]
        probs = self._p_unsafe(batch)
        index = batch.get("row_index")
        if index is None:  # a data module without row indices: this rank's positions (no DDP dedup)
            start = self._test_positions.get(name, 0)
            index = torch.arange(start, start + len(probs), device=probs.device)
            self._test_positions[name] = start + len(probs)
        keep = batch["label"] >= 0  # rows without a human label are not scored
        columns = (index, probs, batch["label"], batch["teacher_score"])
        self._test_buffers.setdefault(name, []).append(tuple(c[keep].detach().cpu() for c in columns))

    def on_test_epoch_start(self) -> None:
        self._test_buffers = {}
        self._test_positions = {}

    def predict_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor:
        return self._p_unsafe(batch)

    def _log_epoch(self, store: torch.nn.ModuleDict, names: list[str]) -> None:
        per_metric: dict[str, list[torch.Tensor]] = {}
        for name in names:
            collection = store[name]
            # compute() syncs across ranks, so every rank must agree on skipping a set
            seen = torch.tensor(float(collection["auprc"].update_called), device=self.device)
            if self.trainer.strategy.reduce(seen, reduce_op="sum") == 0:
                log.warning("eval set %r had no labelled rows this epoch; skipped", name)
                continue
            values = collection.compute()
            if values[f"{name}/auprc"] == 0:  # AP is > 0 whenever there is an unsafe row
                log.warning("eval set %r has no unsafe rows: AUPRC undefined, not logged", name)
                del values[f"{name}/auprc"]
            self.log_dict(values, add_dataloader_idx=False)
            if name != "val":
                for key, value in values.items():
                    per_metric.setdefault(key.split("/", 1)[1], []).append(value)
            collection.reset()
        for key, values in per_metric.items():
            self.log(f"mean/{key}", torch.stack(values).mean(), add_dataloader_idx=False)

    def on_validation_epoch_start(self) -> None:
        self._val_buffer = []

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics, self.val_names)
        if self._val_buffer and not self.trainer.sanity_checking:
            self._calibrate()

    def _calibrate(self) -> None:
        """Set ``calibrated_threshold`` from this epoch's val scores (rank 0's share; all ranks agree)."""
        probs = torch.cat([p for p, _ in self._val_buffer]).double().numpy()
        target = torch.cat([t for _, t in self._val_buffer]).numpy()
        hp = self.hparams
        found = calibrate_threshold(target, probs, hp.threshold_calibration, hp.target_fpr)
        value = self.trainer.strategy.broadcast(float("nan") if found is None else found, src=0)
        self.calibrated_threshold.fill_(value)
        if not math.isnan(value):
            self.log("val/calibrated_threshold", value, add_dataloader_idx=False)
        elif hp.threshold_calibration != "none":
            log.warning("threshold calibration: the val split has one class or one score; not calibrated")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before calibration existed load with an uncalibrated threshold."""
        checkpoint["state_dict"].setdefault("calibrated_threshold", torch.tensor(float("nan")))

    def on_test_epoch_end(self) -> None:
        """Gather every rank's scored rows, count each once, then log ``test/<set>/*`` from them.

        Every rank ends with the same ``test_outputs`` (what the report and plots read on rank 0).
        """
        local: dict[str, TestRows] = {
            name: tuple(torch.cat(column).double().numpy() for column in zip(*parts))  # type: ignore[misc]
            for name, parts in self._test_buffers.items()
        }
        if self.trainer.world_size > 1 and self._test_positions:
            log.warning("test batches carry no row_index: rows repeated across ranks are counted twice")
        rows = merge_rank_rows(all_gather_objects(local))
        self.test_outputs = {
            name: ScoredSet(target=target.astype(np.int64), student=student, teacher=teacher)
            for name, (_, student, target, teacher) in rows.items()
        }
        per_metric: dict[str, list[float]] = {}
        for name in self.test_names:
            scored = self.test_outputs.get(name)
            if scored is None or not len(scored.target):
                log.warning("eval set %r had no labelled rows in this test; skipped", name)
                continue
            values = binary_metrics(
                torch.from_numpy(scored.student), torch.from_numpy(scored.target), self.hparams.threshold
            )
            if not scored.target.any():  # AP is > 0 whenever there is an unsafe row
                log.warning("eval set %r has no unsafe rows: AUPRC undefined, not logged", name)
                del values["auprc"]
            for key, value in values.items():
                self.log(f"test/{name}/{key}", value, rank_zero_only=True, add_dataloader_idx=False)
                per_metric.setdefault(key, []).append(value)
        for key, values in per_metric.items():
            self.log(
                f"test/mean/{key}", float(np.mean(values)), rank_zero_only=True, add_dataloader_idx=False
            )

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        # Biases and normalisation weights (the 1-D parameters) get no weight decay, as in the
        # HarmAug/BERT recipe; matching by shape also covers norms not named "LayerNorm".
        decay, plain = [], []
        for param in self.student.parameters():
            if param.requires_grad:
                (plain if param.ndim < 2 else decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": plain, "weight_decay": 0.0},
            ],
            lr=self.hparams.learning_rate,
            eps=self.hparams.adam_epsilon,
        )
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, num_warmup_steps=min(self.hparams.warmup_steps, total), num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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
from harmaug_pl.categories import (
    Category,
    CategoryHead,
    GuardCategories,
    check_taxonomy,
    hidden_size,
    masked_bce,
    metric_name,
)
from harmaug_pl.deploy.guard import ID2LABEL
from harmaug_pl.errors import ConfigError
from harmaug_pl.evaluation.metrics import Calibration, ScoredSet, calibrate_threshold, set_metrics
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


# row index, P(unsafe), label, teacher; then, with a category head, P(category) and the human
# category labels (-1 unknown), [rows, categories] each
TestRows = tuple[np.ndarray, ...]
CATEGORY_METRICS = ("auprc", "f1", "precision", "recall")


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

    With ``category_weight`` > 0, a category head (:class:`~harmaug_pl.categories.CategoryHead`, one
    sigmoid per entry of ``categories``) reads the features of the same forward pass and adds
    ``category_weight`` x masked BCE to the loss; each category's threshold is calibrated on the val
    split's known labels like the binary one (where the val split has positives and negatives;
    otherwise the category keeps the pack's ``threshold``), and the test pass logs
    ``test/<set>/category/<name>/{auprc,f1,precision,recall,positives}`` on sets with category labels.
    At 0 no head is built: checkpoints and metrics are those of a module without categories.
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
        categories: list[Category] | str | None = None,
        category_weight: float = 0.0,
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
        if not category_weight >= 0.0:
            raise ConfigError(
                f"model.category_weight must be >= 0 (0: no category head), got {category_weight}"
            )
        if category_weight > 0 and not categories:
            raise ConfigError("model.category_weight > 0 needs a taxonomy in model.categories")
        self.categories = check_taxonomy(categories, "model.categories") if categories else []
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
        self.category_head: CategoryHead | None = None
        if category_weight > 0:  # at 0 nothing is built, so no random draw or weight differs
            self.category_head = CategoryHead(hidden_size(self.student), len(self.categories))
            self.category_head.attach(self.student)
            # NaN: not calibrated (the category keeps the pack's threshold); saved in checkpoints
            self.register_buffer("category_thresholds", torch.full((len(self.categories),), float("nan")))
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
        self._val_category_buffer: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- wiring eval sets ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        eval_names = list(getattr(datamodule, "eval_set_names", []))
        self.val_names = ["val", *getattr(datamodule, "validation_eval_set_names", eval_names)]
        self.test_names = eval_names
        self._check_data_categories(getattr(datamodule, "categories", None))
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
        if self.category_head is not None:
            category = masked_bce(self.category_head(), batch["category_target"], batch["category_mask"])
            loss = loss + self.hparams.category_weight * category
            parts["category_bce"] = category.detach()
        bs = logits.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=bs)
        return loss

    def _p_unsafe(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.softmax(self(batch).float(), dim=-1)[:, 1]

    def _p_categories(self) -> torch.Tensor:
        """P(category) per row of the latest forward pass (the head's sigmoids)."""
        assert self.category_head is not None
        return torch.sigmoid(self.category_head().float())

    def guard_categories(self) -> GuardCategories | None:
        """The head, taxonomy and thresholds a guard folder carries; ``None`` without a head."""
        if self.category_head is None:
            return None
        return GuardCategories(self.category_head, self.categories, self.category_threshold_values())

    def category_threshold_values(self) -> list[float]:
        """Each category's threshold: calibrated on val, else the pack's ``threshold``."""
        fallback = float(self.hparams.threshold)
        return [fallback if math.isnan(v) else v for v in self.category_thresholds.tolist()]

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
            if self.category_head is not None:
                # hard targets for calibration: human labels as they are, teacher targets above the threshold
                known = batch["category_mask"].bool()
                hard = (batch["category_target"] > self.hparams.threshold).long().masked_fill(~known, -1)
                self._val_category_buffer.append((self._p_categories().detach().cpu(), hard.cpu()))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self.test_names[dataloader_idx]
        probs = self._p_unsafe(batch)
        index = batch.get("row_index")
        if index is None:  # a data module without row indices: this rank's positions (no DDP dedup)
            start = self._test_positions.get(name, 0)
            index = torch.arange(start, start + len(probs), device=probs.device)
            self._test_positions[name] = start + len(probs)
        keep = batch["label"] >= 0  # rows without a human label are not scored
        columns: tuple[torch.Tensor, ...] = (index, probs, batch["label"], batch["teacher_score"])
        if self.category_head is not None:
            columns += (self._p_categories(), batch["category_label"], batch["category_teacher"])
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
        self._val_category_buffer = []

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics, self.val_names)
        if self._val_buffer and not self.trainer.sanity_checking:
            self._calibrate()
        if self._val_category_buffer and not self.trainer.sanity_checking:
            self._calibrate_categories()

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

    def _calibrate_categories(self) -> None:
        """Per category, the val split's threshold where it has known positives and negatives."""
        probs = torch.cat([p for p, _ in self._val_category_buffer]).double().numpy()
        labels = torch.cat([t for _, t in self._val_category_buffer]).numpy()
        hp = self.hparams
        for k, category in enumerate(self.categories):
            known = labels[:, k] >= 0
            found = calibrate_threshold(
                labels[known, k], probs[known, k], hp.threshold_calibration, hp.target_fpr
            )
            value = self.trainer.strategy.broadcast(float("nan") if found is None else found, src=0)
            self.category_thresholds[k] = value
            name = metric_name(category["name"])
            self.log(
                f"val/category/{name}/positives",
                float((labels[known, k] == 1).sum()),
                add_dataloader_idx=False,
            )
            if not math.isnan(value):
                self.log(f"val/category/{name}/calibrated_threshold", value, add_dataloader_idx=False)

    def _check_data_categories(self, data_categories: list[Category] | None) -> None:
        """A category head needs the data module's batches to carry the same taxonomy's columns; a data
        module without ``categories`` (another LightningDataModule) is not checked."""
        if data_categories is None:
            return
        ours = [c["name"] for c in self.categories] if self.category_head is not None else []
        theirs = [c["name"] for c in data_categories]
        if ours and ours != theirs:
            named = self.hparams.categories
            option = f"--data.categories {named}" if isinstance(named, str) else "data.init_args.categories"
            raise ConfigError(
                f"the model's category head is over {len(ours)} categories ({', '.join(ours)}) but the data "
                f"module gives {', '.join(theirs) or 'none'}: set {option}, the model's taxonomy (packs "
                "write ${model.init_args.categories}); with --ckpt_path the model's settings are the "
                "checkpoint's (LightningCLI reads them from it)"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before calibration existed load with an uncalibrated threshold; one whose
        category head does not fit this module is refused in one line, not torch's state_dict error."""
        state = checkpoint["state_dict"]
        state.setdefault("calibrated_threshold", torch.tensor(float("nan")))
        held = state.get("category_head.linear.weight")
        path = self._trainer.ckpt_path if self._trainer is not None else None
        where = f"checkpoint {path}" if path else "the checkpoint"
        if self.category_head is not None and held is None:
            raise ConfigError(
                f"{where} has no category head (trained with model.category_weight 0, or before categories "
                f"existed) but this run builds one (model.category_weight {self.hparams.category_weight}): "
                "set --model.category_weight 0 to use it without categories"
            )
        if self.category_head is None and held is not None:
            raise ConfigError(
                f"{where} holds a category head ({held.shape[0]} categories) but this run builds none "
                "(model.category_weight 0): load it with the category_weight and categories it was trained "
                "with"
            )
        if held is not None and held.shape[0] != len(self.categories):
            raise ConfigError(
                f"{where} holds a category head over {held.shape[0]} categories but model.categories has "
                f"{len(self.categories)}: set --model.categories to the taxonomy it was trained with"
            )

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
            name: ScoredSet(
                target=columns[2].astype(np.int64),
                student=columns[1],
                teacher=columns[3],
                category_student=columns[4] if len(columns) > 4 else None,
                category_target=columns[5].astype(np.int64) if len(columns) > 5 else None,
                category_teacher=columns[6] if len(columns) > 6 else None,
            )
            for name, columns in rows.items()
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
        if self.category_head is not None:
            self._log_test_categories()

    def category_results(self, scored: ScoredSet, scorer: str = "student") -> dict[str, Any]:
        """Per category with known labels in ``scored``: the student's (or, ``scorer="teacher"``, the
        teacher's, where it scored every such row, at the pack's threshold) metrics at the category's
        threshold."""
        assert scored.category_student is not None and scored.category_target is not None
        scores = scored.category_student if scorer == "student" else scored.category_teacher
        results = {}
        if scores is None:
            return results
        thresholds = (
            self.category_threshold_values()
            if scorer == "student"
            else [float(self.hparams.threshold)] * len(self.categories)  # the teacher's hard-label rule
        )
        for k, (category, threshold) in enumerate(zip(self.categories, thresholds)):
            known = scored.category_target[:, k] >= 0
            if known.any() and not np.isnan(scores[known, k]).any():
                results[category["name"]] = set_metrics(
                    scored.category_target[known, k], scores[known, k], threshold
                )
        return results

    def _log_test_categories(self) -> None:
        for name in self.test_names:
            scored = self.test_outputs.get(name)
            if scored is None or scored.category_target is None:
                continue
            for category, metrics in self.category_results(scored).items():
                prefix = f"test/{name}/category/{metric_name(category)}"
                values = {key: getattr(metrics, key) for key in CATEGORY_METRICS}
                values["positives"] = metrics.n_unsafe
                for key, value in values.items():
                    if value is not None:
                        self.log(
                            f"{prefix}/{key}", float(value), rank_zero_only=True, add_dataloader_idx=False
                        )

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        # Biases and normalisation weights (the 1-D parameters) get no weight decay, as in the
        # HarmAug/BERT recipe; matching by shape also covers norms not named "LayerNorm".
        decay, plain = [], []
        for param in self.parameters():
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

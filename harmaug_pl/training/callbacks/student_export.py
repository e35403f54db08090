"""At the end of fit: the student's guard folder, written from the best checkpoint and logged to MLflow."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L

from harmaug_pl.errors import ConfigError
from harmaug_pl.training.callbacks.mlflow_logging import (
    log_augmentation_stats,
    log_dataset_inputs,
    mlflow_logger,
)
from harmaug_pl.training.checkpoints import best_checkpoint, checkpoint_weights

log = logging.getLogger(__name__)


class StudentExport(L.Callback):
    """At the end of fit: write the student's guard folder from the best checkpoint, log it to MLflow.

    The weights are those of :func:`best_checkpoint` (the ones the run's test pass scores with
    ``test_after_fit``), or the fit's final weights when no checkpoint was saved; the model card's
    ``weights`` line says which.

    The folder (:func:`harmaug_pl.deploy.export.write_guard_folder`: safetensors, tokenizer, ``id2label``,
    model card, ``harmaug_guard.json`` with the training max length and threshold) loads with
    ``transformers.pipeline("text-classification", model=folder, truncation=True)`` and with
    ``Guard.from_pretrained``. It is logged as the run's ``guard/`` artifact (what ``harmaug export
    --mlflow_run`` downloads). The MLflow *model* (registered, deployable) is logged after the test
    pass by :class:`harmaug_pl.training.callbacks.guard_registry.GuardRegistry`, once its evaluation exists.
    ``formats`` adds ``onnx`` and/or ``int8`` (ONNX) files to the folder, each verified against the
    student's scores on a sample (``export_report.json``); they need the ``export`` extra.
    """

    def __init__(self, export_dir: str = "runs/harmaug/student", formats: list[str] | None = None) -> None:
        from harmaug_pl.deploy.export import FORMATS

        unknown = sorted(set(formats or []) - set(FORMATS))
        if unknown:
            raise ConfigError(f"export.formats: unknown {unknown}; choose from {list(FORMATS)}")
        self.export_dir = Path(export_dir)
        self.formats = list(formats or [])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_augmentation_stats(trainer, getattr(trainer.datamodule, "augmentation_stats", {}))
        log_dataset_inputs(trainer)

    @staticmethod
    def card(
        trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: str | None = None
    ) -> dict[str, Any]:
        """What the model card states: base model, teacher, data, which weights, their metrics.

        From a checkpoint: its monitored score; from the final weights: the last logged metrics.
        """
        datamodule = trainer.datamodule
        teacher = getattr(getattr(datamodule, "pipeline", None), "teacher", None)
        seed = getattr(datamodule, "seed_data", None)
        data = getattr(seed, "display", "not recorded")
        if hasattr(datamodule, "augment"):
            data += " + HarmAug synthetic rows" if datamodule.augment else " (KD only, no augmentation)"
        callback = trainer.checkpoint_callback
        if checkpoint is not None and callback is not None and getattr(callback, "monitor", None):
            source = f"best checkpoint {Path(checkpoint).name} ({callback.monitor})"
            score = callback.best_model_score
            metrics = {f"best {callback.monitor}": float(score)} if score is not None else {}
        else:
            source = (
                f"checkpoint {Path(checkpoint).name} (newest; the ModelCheckpoint monitors nothing)"
                if checkpoint is not None
                else "final weights of the fit (no checkpoint was saved)"
            )
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        return {
            "student_base": pl_module.hparams.get("student", "unknown"),
            "teacher": json.dumps(teacher.describe()) if teacher is not None else "not recorded",
            "data": data,
            "source": source,
            "metrics": metrics,
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from harmaug_pl.deploy.export import export, write_guard_folder
        from harmaug_pl.deploy.guard import Guard, GuardSettings

        if trainer.global_rank != 0:
            return
        settings = GuardSettings(
            max_length=trainer.datamodule.max_length, threshold=pl_module.hparams.get("threshold", 0.5)
        )
        tokenizer = trainer.datamodule.tokenizer
        checkpoint = best_checkpoint(trainer)
        card = self.card(trainer, pl_module, checkpoint)
        with checkpoint_weights(pl_module, checkpoint):
            categories = pl_module.guard_categories() if hasattr(pl_module, "guard_categories") else None
            write_guard_folder(pl_module.student, tokenizer, self.export_dir, settings, card, categories)
            if self.formats:
                reference = Guard.from_model(pl_module.student, tokenizer, settings, categories)
                export(self.export_dir, reference, formats=("hf", *self.formats))
                pl_module.student.train(pl_module.training)  # Guard.from_model set eval mode
            log.info("student exported to %s (%s)", self.export_dir, card["source"])
            self._log_to_mlflow(trainer, pl_module.student, tokenizer)

    def _log_to_mlflow(self, trainer: L.Trainer, student: Any, tokenizer: Any) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        logger.experiment.log_artifacts(logger.run_id, str(self.export_dir), "guard")

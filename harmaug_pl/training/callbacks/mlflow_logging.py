"""What a run puts into MLflow besides metrics: the resolved pack and the augmentation statistics."""

from __future__ import annotations

import json
import logging

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

log = logging.getLogger(__name__)


def mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    """The trainer's MLflow logger, if it has one (packs may add others beside it)."""
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return logger
    return None


class MLflowSaveConfig(SaveConfigCallback):
    """Log every resolved hyperparameter and the resolved pack YAML to the MLflow run.

    A later command that logs into the same run (``harmaug test --run_id``) adds its resolved pack
    as ``config/pack.<stage>.yaml`` and leaves the parameters as the first command logged them
    (MLflow parameters cannot change, and ``ckpt_path`` or ``run_id`` differ between commands).
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None or trainer.global_rank != 0:
            return
        resolved = self.parser.dump(self.config, skip_none=False)
        if logger.experiment.get_run(logger.run_id).data.params:
            name = getattr(stage, "value", stage)  # Lightning passes a str enum
            logger.experiment.log_text(logger.run_id, resolved, f"config/pack.{name}.yaml")
            return
        logger.log_hyperparams(self.config.as_dict())
        logger.experiment.log_text(logger.run_id, resolved, "config/pack.yaml")


def log_augmentation_stats(trainer: L.Trainer, stats: dict[str, float | int]) -> None:
    """Augmentation statistics as MLflow metrics (step 0) and as a JSON artifact."""
    logger = mlflow_logger(trainer)
    if logger is None or trainer.global_rank != 0 or not stats:
        return
    logger.log_metrics({f"augment/{k}": float(v) for k, v in stats.items()}, step=0)
    logger.experiment.log_text(logger.run_id, json.dumps(stats, indent=2), "augment/stats.json")

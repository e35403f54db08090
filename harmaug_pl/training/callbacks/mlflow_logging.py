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


def log_dataset_inputs(trainer: L.Trainer) -> None:
    """The seed, augmented and eval sets as the run's MLflow dataset inputs (name, digest, schema,
    row count: what the UI's Datasets panel shows; MLflow stores no row text)."""
    logger = mlflow_logger(trainer)
    datamodule = getattr(trainer, "datamodule", None)
    if logger is None or trainer.global_rank != 0 or datamodule is None:
        return
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    rows = [*getattr(datamodule, "train_rows", []), *getattr(datamodule, "val_rows", [])]
    seed = getattr(datamodule, "seed_data", None)
    parts = [
        (getattr(seed, "name", None) or "seed", [r for r in rows if r.source == "seed"], "training"),
        ("augmented", rows, "training"),
        *(
            (name, eval_rows, "evaluation")
            for name, eval_rows in getattr(datamodule, "eval_rows", {}).items()
        ),
    ]
    inputs = []
    for name, part, context in parts:
        if not part:
            continue
        frame = pd.DataFrame(
            {
                "prompt": [r.prompt for r in part],
                "response": [r.response for r in part],
                "label": [None if r.label is None else float(r.label) for r in part],
                "teacher_score": [r.teacher_score for r in part],
                "source": [r.source for r in part],
            }
        )
        dataset = mlflow.data.from_pandas(frame, name=name)
        tags = [InputTag(key="mlflow.data.context", value=context)]
        inputs.append(DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags))
    if inputs:
        logger.experiment.log_inputs(logger.run_id, datasets=inputs)

"""After the test pass: log (and register) the tested guard as the run's MLflow model."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import lightning as L

from harmaug_pl.deploy.registry import already_logged, log_guard_model
from harmaug_pl.errors import ConfigError
from harmaug_pl.training.callbacks.eval_reporter import EvalReporter
from harmaug_pl.training.callbacks.mlflow_logging import mlflow_logger
from harmaug_pl.training.callbacks.student_export import StudentExport

log = logging.getLogger(__name__)


class GuardRegistry(L.Callback):
    """After a test pass's evaluation report: the tested guard as an MLflow model, registered.

    ``registered_model_name`` (set in the packs) names the Model Registry entry; ``None`` logs the
    model to the run without registering it; ``enabled: false`` does neither. One model per run:
    a later test pass into the same run leaves the first one.
    """

    def __init__(self, registered_model_name: str | None = None, enabled: bool = True) -> None:
        if registered_model_name is not None and not registered_model_name.strip():
            raise ConfigError("registry.registered_model_name must not be empty (null: do not register)")
        self.registered_model_name = registered_model_name
        self.enabled = enabled
        self.result: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        callbacks = trainer.callbacks
        reporters = [i for i, c in enumerate(callbacks) if isinstance(c, EvalReporter)]
        if self.enabled and reporters and reporters[0] > callbacks.index(self):
            raise ConfigError("GuardRegistry must come after EvalReporter: it logs the report's metrics")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from harmaug_pl.deploy.export import write_guard_folder
        from harmaug_pl.deploy.guard import GuardSettings

        logger = mlflow_logger(trainer)
        if not self.enabled or logger is None or trainer.global_rank != 0:
            return
        reporter = next((c for c in trainer.callbacks if isinstance(c, EvalReporter)), None)
        if reporter is None or reporter.report is None:
            log.warning("no evaluation report in this test pass: the guard is not logged as an MLflow model")
            return
        import mlflow

        mlflow.set_tracking_uri(logger._tracking_uri)
        if already_logged(logger.run_id, logger.experiment.get_run(logger.run_id).info.experiment_id):
            log.info("run %s already has its guard model; not logging another", logger.run_id)
            return
        settings = GuardSettings(
            max_length=trainer.datamodule.max_length, threshold=float(pl_module.hparams.get("threshold", 0.5))
        )
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_guard_folder(
                pl_module.student,
                trainer.datamodule.tokenizer,
                Path(tmp) / "guard",
                settings,
                StudentExport.card(trainer, pl_module),
                pl_module.guard_categories() if hasattr(pl_module, "guard_categories") else None,
            )
            self.result = log_guard_model(
                folder,
                settings.threshold,
                logger.run_id,
                self.registered_model_name,
                description=f"Run {logger.run_id}.\n\n{reporter.report.to_markdown()}",
                step=trainer.global_step,  # where EvalReporter logged the report's metrics
            )
        where = self.result.get("uri", self.result["model_uri"])
        log.info("guard logged as an MLflow model: %s (%.1f s)", where, self.result["seconds"])

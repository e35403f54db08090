"""After the test pass: the guard's cost profile beside the teacher's, logged to MLflow."""

from __future__ import annotations

import json

import lightning as L

from harmaug_pl.evaluation.cost_profile import markdown, profile_scorer, with_ratios
from harmaug_pl.training.callbacks.mlflow_logging import mlflow_logger


class CostProfile(L.Callback):
    """At test end: profile the student against the data module's teacher on a sample of eval rows.

    Logs ``cost/<scorer>/<metric>`` metrics and ``cost_profile/table.md`` + ``.json`` to MLflow.
    Ratios are relative to the student. The teacher is loaded again if fit closed it (its memory
    then includes its weights; the student's on CPU does not, it is already loaded).
    """

    def __init__(self, sample_size: int = 64, batch_size: int = 32, latency_rows: int = 32) -> None:
        self.sample_size = sample_size
        self.batch_size = batch_size
        self.latency_rows = latency_rows

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from harmaug_pl.deploy.guard import Guard, GuardSettings

        datamodule = trainer.datamodule
        if trainer.global_rank != 0 or not getattr(datamodule, "eval_rows", None):
            return
        rows = [row for name in datamodule.eval_set_names for row in datamodule.eval_rows[name]]
        rows = rows[: self.sample_size]
        prompts, responses = [r.prompt for r in rows], [r.response for r in rows]
        settings = GuardSettings(max_length=datamodule.max_length, threshold=pl_module.hparams.threshold)
        student = Guard.from_model(pl_module.student, datamodule.tokenizer, settings)
        teacher = datamodule.pipeline.teacher
        results = []
        for name, scorer in (("student", student), ("teacher", teacher)):
            row, _ = profile_scorer(
                name,
                lambda scorer=scorer: scorer,
                prompts,
                responses,
                batch_size=self.batch_size,
                latency_rows=self.latency_rows,
                device=pl_module.device,
            )
            results.append(row)
        with_ratios(results, "student")
        table = markdown(results)
        logger = mlflow_logger(trainer)
        if logger is None:
            print(table)
            return
        metrics = {
            f"cost/{row['name']}/{key}": float(value)
            for row in results
            for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None
        }
        logger.log_metrics(metrics)
        logger.experiment.log_text(logger.run_id, table + "\n", "cost_profile/table.md")
        logger.experiment.log_text(logger.run_id, json.dumps(results, indent=2), "cost_profile/table.json")

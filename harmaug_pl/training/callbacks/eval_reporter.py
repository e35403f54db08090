"""The evaluation report of a test pass (student, calibrated threshold, teacher, paper numbers),
into MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from harmaug_pl.data.presets import load_preset
from harmaug_pl.errors import ConfigError
from harmaug_pl.evaluation.metrics import ScoredSet
from harmaug_pl.evaluation.report import CategoryRow, EvalReport
from harmaug_pl.training.callbacks.eval_plots import calibrated_threshold
from harmaug_pl.training.callbacks.mlflow_logging import mlflow_logger

log = logging.getLogger(__name__)


def category_rows(pl_module: L.LightningModule, outputs: dict[str, ScoredSet]) -> list[CategoryRow]:
    """Per eval set with category labels and per category: the student's metrics and threshold."""
    if getattr(pl_module, "category_head", None) is None:
        return []
    calibrated = [v == v for v in pl_module.category_thresholds.tolist()]  # NaN: not calibrated
    source = {c["name"]: "val" if ok else "fallback" for c, ok in zip(pl_module.categories, calibrated)}
    openai = {c["name"]: c.get("openai") for c in pl_module.categories}
    return [
        CategoryRow(
            set_name, scorer, name, openai[name], source[name] if scorer == "student" else "pack", metrics
        )
        for set_name, scored in outputs.items()
        if scored.category_target is not None
        for scorer in ("student", "teacher")
        for name, metrics in pl_module.category_results(scored, scorer).items()
    ]


class EvalReporter(L.Callback):
    """After every test run: the evaluation report (student, teacher, published), printed and logged.

    MLflow gets ``report/...`` metrics and ``report/eval_report.md`` / ``report/eval_report.csv``,
    and the tag ``eval_report.weights``: the checkpoint the report scores.
    The student is reported at the module's threshold and at its val-calibrated one; the teacher at
    the module's threshold (its hard-label rule), on the same rows.
    """

    def __init__(self, ece_bins: int = 10) -> None:
        if ece_bins < 1:
            raise ConfigError(f"report.ece_bins must be >= 1, got {ece_bins}")
        self.ece_bins = ece_bins
        self.report: EvalReport | None = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        outputs: dict[str, ScoredSet] = getattr(pl_module, "test_outputs", {})
        if trainer.global_rank != 0 or not outputs:
            return
        datamodule = getattr(trainer, "datamodule", None)
        sources = getattr(datamodule, "eval_sources", {})
        presets = {
            name: load_preset(sources[name].preset) if name in sources and sources[name].preset else None
            for name in outputs
        }
        self.report = EvalReport.build(
            outputs,
            presets,
            threshold=float(pl_module.hparams.threshold),
            calibrated_threshold=calibrated_threshold(pl_module),
            unlabelled=getattr(datamodule, "eval_unlabelled", {}),
            ece_bins=self.ece_bins,
            skipped=getattr(datamodule, "eval_skipped", {}),
            categories=category_rows(pl_module, outputs),
        )
        ckpt = trainer.ckpt_path
        weights = str(Path(ckpt).resolve()) if ckpt and Path(ckpt).is_file() else ckpt
        weights = weights or "the module's weights in memory (no checkpoint loaded)"
        markdown = f"Weights: {weights}\n\n{self.report.to_markdown()}"
        print(markdown)
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        logger.experiment.set_tag(logger.run_id, "eval_report.weights", str(weights))
        logger.log_metrics(self.report.metrics(), step=trainer.global_step)
        logger.experiment.log_text(logger.run_id, markdown, "report/eval_report.md")
        logger.experiment.log_text(logger.run_id, self.report.to_csv(), "report/eval_report.csv")

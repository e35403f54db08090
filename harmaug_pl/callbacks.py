"""Callbacks that put what a run produced into MLflow: config, augmentation stats, plots, the model."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from harmaug_pl.errors import ConfigError
from harmaug_pl.evaluation.metrics import ScoredSet
from harmaug_pl.evaluation.presets import load_preset
from harmaug_pl.evaluation.report import EvalReport

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
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    pl_module.load_state_dict(checkpoint["state_dict"])
    try:
        yield
    finally:
        pl_module.load_state_dict(own)


class StudentExport(L.Callback):
    """At the end of fit: write the student's guard folder from the best checkpoint, log it to MLflow.

    The weights are those of :func:`best_checkpoint` (the ones the run's test pass scores with
    ``test_after_fit``), or the fit's final weights when no checkpoint was saved; the model card's
    ``weights`` line says which.

    The folder (:func:`harmaug_pl.export.write_guard_folder`: safetensors, tokenizer, ``id2label``,
    model card, ``harmaug_guard.json`` with the training max length and threshold) loads with
    ``transformers.pipeline("text-classification", model=folder, truncation=True)`` and with
    ``Guard.from_pretrained``. It is logged as the run's ``guard/`` artifact (what ``harmaug export
    --mlflow_run`` downloads). The MLflow *model* (registered, deployable) is logged after the test
    pass by :class:`harmaug_pl.registry.GuardRegistry`, once its evaluation exists.
    ``formats`` adds ``onnx`` and/or ``int8`` (ONNX) files to the folder, each verified against the
    student's scores on a sample (``export_report.json``); they need the ``export`` extra.
    """

    def __init__(self, export_dir: str = "runs/harmaug/student", formats: list[str] | None = None) -> None:
        from harmaug_pl.errors import ConfigError
        from harmaug_pl.export import FORMATS

        unknown = sorted(set(formats or []) - set(FORMATS))
        if unknown:
            raise ConfigError(f"export.formats: unknown {unknown}; choose from {list(FORMATS)}")
        self.export_dir = Path(export_dir)
        self.formats = list(formats or [])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_augmentation_stats(trainer, getattr(trainer.datamodule, "augmentation_stats", {}))

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
        from harmaug_pl.export import export, write_guard_folder
        from harmaug_pl.guard import Guard, GuardSettings

        if trainer.global_rank != 0:
            return
        settings = GuardSettings(
            max_length=trainer.datamodule.max_length, threshold=pl_module.hparams.get("threshold", 0.5)
        )
        tokenizer = trainer.datamodule.tokenizer
        checkpoint = best_checkpoint(trainer)
        card = self.card(trainer, pl_module, checkpoint)
        with checkpoint_weights(pl_module, checkpoint):
            write_guard_folder(pl_module.student, tokenizer, self.export_dir, settings, card)
            if self.formats:
                reference = Guard.from_model(pl_module.student, tokenizer, settings)
                export(self.export_dir, reference, formats=("hf", *self.formats))
                pl_module.student.train(pl_module.training)  # Guard.from_model set eval mode
            log.info("student exported to %s (%s)", self.export_dir, card["source"])
            self._log_to_mlflow(trainer, pl_module.student, tokenizer)

    def _log_to_mlflow(self, trainer: L.Trainer, student: Any, tokenizer: Any) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        logger.experiment.log_artifacts(logger.run_id, str(self.export_dir), "guard")


def calibrated_threshold(pl_module: L.LightningModule) -> float | None:
    """The module's val-calibrated threshold, or None when it has none (yet)."""
    value = getattr(pl_module, "calibrated_threshold", None)
    if value is None or torch.isnan(value):
        return None
    return float(value)


class EvalPlots(L.Callback):
    """Per eval set, one MLflow PNG: PR curves (student and teacher), confusion matrices, score histograms.

    Confusion matrices are drawn at ``threshold`` and, when the module calibrated one on the val
    split, at the calibrated threshold too.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = mlflow_logger(trainer)
        outputs: dict[str, ScoredSet] = getattr(pl_module, "test_outputs", {})
        if logger is None or trainer.global_rank != 0:
            return
        for name, scored in outputs.items():
            figure = self.figure(name, scored, calibrated_threshold(pl_module))
            logger.experiment.log_figure(logger.run_id, figure, f"plots/{name}.png")
            plt.close(figure)

    def figure(self, name: str, scored: ScoredSet, calibrated: float | None = None) -> plt.Figure:
        from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay

        fig, axes = plt.subplots(2, 3, figsize=(16, 9))
        ax_pr, ax_cm, ax_cm_cal, ax_hist, ax_hist_teacher, ax_cm_teacher = axes.ravel()
        scorers = {"student": scored.student}
        if scored.teacher is not None:
            scorers["teacher"] = scored.teacher
        if len(set(scored.target.tolist())) == 2:
            for label, scores in scorers.items():
                PrecisionRecallDisplay.from_predictions(scored.target, scores, ax=ax_pr, name=label)
        else:
            ax_pr.text(0.5, 0.5, "one class only:\nPR curve undefined", ha="center", va="center")
        ax_pr.set_title(f"{name}: precision-recall")
        matrices = (
            (ax_cm, "student", self.threshold, "threshold"),
            (ax_cm_cal, "student", calibrated, "calibrated threshold"),
            (ax_cm_teacher, "teacher", self.threshold, "threshold"),
        )
        for ax, label, threshold, kind in matrices:
            if threshold is None or label not in scorers:
                ax.axis("off")
                missing = "no calibrated threshold" if threshold is None else "no teacher scores"
                ax.text(0.5, 0.5, missing, ha="center", va="center")
                continue
            ConfusionMatrixDisplay.from_predictions(
                scored.target,
                (scorers[label] > threshold).astype(int),
                labels=[0, 1],
                display_labels=["safe", "unsafe"],
                ax=ax,
                colorbar=False,
            )
            ax.set_title(f"{label}, {kind} {threshold:.3g}")
        for ax, label in ((ax_hist, "student"), (ax_hist_teacher, "teacher")):
            if label not in scorers:
                ax.axis("off")
                continue
            self._histogram(ax, scorers[label], scored.target, label, calibrated)
        fig.tight_layout()
        return fig

    def _histogram(self, ax: Any, scores: Any, target: Any, label: str, calibrated: float | None) -> None:
        for value, colour in ((0, "tab:green"), (1, "tab:red")):
            ax.hist(
                scores[target == value],
                bins=20,
                range=(0, 1),
                alpha=0.6,
                color=colour,
                label=("safe" if value == 0 else "unsafe"),
            )
        ax.axvline(self.threshold, color="black", linestyle="--", label=f"threshold {self.threshold:g}")
        if calibrated is not None and label == "student":
            ax.axvline(calibrated, color="tab:blue", linestyle=":", label=f"calibrated {calibrated:.3g}")
        ax.set_xlabel(f"{label} P(unsafe)")
        ax.set_title(f"{label} scores by human label")
        ax.legend()


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

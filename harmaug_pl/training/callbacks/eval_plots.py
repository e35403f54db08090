"""Per eval set, one figure (PR curve, confusion matrices, score histograms) logged to MLflow."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import matplotlib
import matplotlib.pyplot as plt
import torch

from harmaug_pl.evaluation.metrics import ScoredSet
from harmaug_pl.training.callbacks.mlflow_logging import mlflow_logger

matplotlib.use("Agg")


log = logging.getLogger(__name__)


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
            if scored.category_target is not None and hasattr(pl_module, "category_results"):
                figure = category_figure(name, pl_module.category_results(scored))
                logger.experiment.log_figure(logger.run_id, figure, f"plots/{name}_categories.png")
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


def category_figure(name: str, results: dict[str, Any]) -> plt.Figure:
    """Per category: AUPRC and F1 at its threshold as bars, each labelled with its positive count."""
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4.5))
    x = range(len(names))
    for offset, metric in ((-0.2, "auprc"), (0.2, "f1")):
        values = [getattr(results[n], metric) or 0.0 for n in names]
        ax.bar([i + offset for i in x], values, width=0.4, label=metric.upper())
    for i, n in enumerate(names):
        ax.text(i, 1.02, f"{results[n].n_unsafe} pos", ha="center", fontsize=8)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"{name}: per category (human labels; F1 at each category's threshold)")
    ax.legend()
    fig.tight_layout()
    return fig

"""The evaluation report of a test pass (student, calibrated threshold, teacher, paper numbers),
into MLflow."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from harmaug_pl.data.encoding import encode_pairs
from harmaug_pl.data.presets import load_preset
from harmaug_pl.errors import ConfigError
from harmaug_pl.evaluation.metrics import ScoredSet, auprc
from harmaug_pl.evaluation.perturbation import DEFAULT_PERTURBATIONS, ScoresByTokens, check_names, perturb
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


def student_scorer(trainer: L.Trainer, pl_module: L.LightningModule, datamodule: Any) -> ScoresByTokens:
    """P(unsafe) of the module's student on any texts, tokenised as the data module does, in batches
    of similar length and the test pass's precision (its scores are reused: clean rows, rows that
    tokenise alike)."""
    batch_size = int(getattr(datamodule, "eval_batch_size", 32))

    def score(prompts: list[str], responses: list[str | None]) -> np.ndarray:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i] or ""))
        scores = np.empty(len(prompts))
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.inference_mode(), trainer.precision_plugin.test_step_context():
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    batch = encode_pairs(
                        datamodule.tokenizer,
                        [prompts[i] for i in rows],
                        [responses[i] for i in rows],
                        datamodule.max_length,
                    )
                    logits = pl_module({k: v.to(pl_module.device) for k, v in batch.items()})
                    scores[rows] = torch.softmax(logits.float(), dim=-1)[:, 1].cpu().numpy()
        finally:
            pl_module.train(was_training)
        return scores

    return ScoresByTokens(datamodule.tokenizer, datamodule.max_length, score)


class EvalReporter(L.Callback):
    """After every test run: the evaluation report (student, teacher, published), printed and logged.

    MLflow gets ``report/...`` metrics and ``report/eval_report.md`` / ``report/eval_report.csv``,
    and the tag ``eval_report.weights``: the checkpoint the report scores.
    The student is reported at the module's threshold and at its val-calibrated one; the teacher at
    the module's threshold (its hard-label rule), on the same rows.

    ``perturbations`` (names in :data:`~harmaug_pl.evaluation.perturbation.PERTURBATIONS`; ``[]``:
    none) adds the student's AUPRC on ``perturbation_sets`` (``None``: every eval set) with each row's
    texts rewritten, seeded by ``perturbation_seed``: one more scoring pass per rewrite, minus the rows
    that tokenise as the clean text does.
    """

    def __init__(
        self,
        ece_bins: int = 10,
        perturbations: list[str] | None = None,
        perturbation_sets: list[str] | None = None,
        perturbation_seed: int = 0,
    ) -> None:
        if ece_bins < 1:
            raise ConfigError(f"report.ece_bins must be >= 1, got {ece_bins}")
        self.ece_bins = ece_bins
        chosen = DEFAULT_PERTURBATIONS if perturbations is None else perturbations
        self.perturbations = check_names(chosen, "report.perturbations")
        self.perturbation_sets = perturbation_sets
        self.perturbation_seed = perturbation_seed
        self.report: EvalReport | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """An unknown set in ``report.perturbation_sets`` stops the run before any training."""
        sources = getattr(getattr(trainer, "datamodule", None), "eval_sources", None)
        unknown = sorted(set(self.perturbation_sets or ()) - set(sources or ()))
        if sources is not None and unknown:
            raise ConfigError(
                f"report.perturbation_sets: {unknown} are not eval sets of this run (data.eval_sets: "
                f"{sorted(sources)})"
            )

    def perturbed_auprc(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict[str, ScoredSet]
    ) -> dict[str, dict[str, float | None]]:
        """Per chosen eval set and perturbation: the student's AUPRC on the rewritten labelled rows."""
        datamodule = getattr(trainer, "datamodule", None)
        rows_by_set = getattr(datamodule, "eval_rows", {})
        wanted = self.perturbation_sets if self.perturbation_sets is not None else list(outputs)
        names = [name for name in wanted if name in outputs and name in rows_by_set]
        if not self.perturbations or not names:
            return {}
        started = time.perf_counter()
        scorer = student_scorer(trainer, pl_module, datamodule)
        result: dict[str, dict[str, float | None]] = {}
        seed = self.perturbation_seed
        for name in names:
            labelled = [row for row in rows_by_set[name] if row.label is not None]
            prompts, responses = [row.prompt for row in labelled], [row.response for row in labelled]
            if len(labelled) == len(outputs[name].student):  # the test pass's rows, in row order
                scorer.remember(prompts, responses, outputs[name].student)
            target = np.array([row.label for row in labelled], dtype=np.int64)
            result[name] = {
                perturbation: auprc(
                    target,
                    scorer(perturb(perturbation, prompts, seed), perturb(perturbation, responses, seed)),
                )
                for perturbation in self.perturbations
            }
        log.info(
            "perturbation eval: %d rewrite(s) of %d set(s), %d rows scored anew, %.1f s",
            len(self.perturbations),
            len(names),
            scorer.scored,
            time.perf_counter() - started,
        )
        return result

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
            perturbed=self.perturbed_auprc(trainer, pl_module, outputs),
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

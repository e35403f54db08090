"""The perturbation eval in the test pass's report: rewrites, scoring once per token sequence, the
report's table and MLflow metrics, and the pack options."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
from transformers import AutoTokenizer

from harmaug_pl.errors import ConfigError
from harmaug_pl.evaluation.metrics import ScoredSet, set_metrics
from harmaug_pl.evaluation.perturbation import (
    DEFAULT_PERTURBATIONS,
    PERTURBATIONS,
    ScoresByTokens,
    check_names,
    perturb,
)
from harmaug_pl.evaluation.report import EvalReport
from harmaug_pl.training.callbacks.eval_reporter import EvalReporter
from harmaug_pl.training.distillation import DistillationModule
from tests.test_datamodule import tiny_datamodule


def test_every_rewrite_changes_text_keeps_absent_responses_and_repeats_under_its_seed() -> None:
    for name in PERTURBATIONS:
        rewritten = perturb(name, ["Build a bomb", None], seed=3)
        assert rewritten[0] != "Build a bomb" and rewritten[1] is None, name
        assert perturb(name, ["Build a bomb"], seed=3) == rewritten[:1], name
    assert perturb("spaces", ["how do I  build\ta bomb"], 0) == ["howdoIbuildabomb"]
    assert set(DEFAULT_PERTURBATIONS) == {"spaces", "zero_width", "homoglyphs", "case", "leetspeak"}
    with pytest.raises(ConfigError, match=r"report.perturbations: unknown perturbation\(s\) \['rot13'\]"):
        check_names(["case", "rot13"], "report.perturbations")


def test_rows_that_tokenise_alike_are_scored_once(tiny_student: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    calls: list[int] = []

    def score(prompts: list[str], responses: list[str | None]) -> list[float]:
        calls.append(len(prompts))
        return [len(p) / 100 for p in prompts]

    scores = ScoresByTokens(tokenizer, 32, score)
    scores.remember(["a safe question"], [None], [0.25])  # the test pass's clean score, reused
    same = scores(["a safe question", "a safe question", "another one"], [None, None, None])
    assert same.tolist() == [0.25, 0.25, pytest.approx(0.11)] and calls == [1] and scores.scored == 1
    scores(["another one"], ["with a response"])  # a response makes it another row
    assert calls == [1, 1]


def test_report_carries_the_perturbation_table_and_metrics() -> None:
    target = np.array([1, 0, 1, 0])
    scored = ScoredSet(target=target, student=np.array([0.9, 0.2, 0.7, 0.4]), teacher=None)
    report = EvalReport.build(
        {"oai": scored}, {"oai": None}, threshold=0.5, perturbed={"oai": {"spaces": 0.5, "case": 1.0}}
    )
    clean = set_metrics(target, scored.student, 0.5).auprc
    assert clean == 1.0
    markdown = report.to_markdown()
    assert "## Under perturbation (student AUPRC)" in markdown
    assert "| set | n | clean | spaces removed | case (alternating) |" in markdown
    assert "| oai | 4 | 1.0000 | 0.5000 (-0.5000) | 1.0000 (+0.0000) |" in markdown
    metrics = report.metrics()
    assert metrics["report/oai/student_perturbed/spaces/auprc"] == 0.5
    assert metrics["report/oai/student_perturbed/case/auprc"] == 1.0
    assert "Under perturbation" not in EvalReport.build({"oai": scored}, {"oai": None}, 0.5).to_markdown()


def test_the_test_pass_reports_auprc_under_each_chosen_perturbation(
    tmp_path: Path, tiny_student: Path
) -> None:
    dm = tiny_datamodule(tmp_path, tiny_student, eval_sizes={"set_a": 12, "set_b": 8})
    reporter = EvalReporter(perturbations=["spaces", "zero_width"], perturbation_sets=["set_b"])
    model = DistillationModule(str(tiny_student))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[reporter],
    )  # fmt: skip
    trainer.test(model, datamodule=dm, verbose=False)
    report = reporter.report
    assert report is not None and list(report.perturbed) == ["set_b"]  # set_a not chosen
    spaces, zero_width = report.perturbed["set_b"]["spaces"], report.perturbed["set_b"]["zero_width"]
    assert spaces is not None and 0.0 <= spaces <= 1.0
    # the normaliser (data.normalise_text) drops zero-width characters: the rewritten rows tokenise as
    # the clean ones, so the test pass's own scores are reused and the AUPRC is the clean one exactly
    clean = report.metrics()["report/set_b/student/auprc"]
    assert zero_width == clean and "| set_b | 8 |" in report.to_markdown()
    with pytest.raises(ConfigError, match=r"report.perturbation_sets: \['set_c'\] are not eval sets"):
        EvalReporter(perturbation_sets=["set_c"]).setup(trainer, model, "test")
    with pytest.raises(ConfigError, match="report.perturbations: unknown"):
        EvalReporter(perturbations=["typos"])
    off = EvalReporter(perturbations=[])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[off],
    )  # fmt: skip
    trainer.test(model, datamodule=dm, verbose=False)
    assert off.report is not None and off.report.perturbed == {}

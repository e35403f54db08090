"""Cost profile: every figure is measured and sane; the callback logs the table to MLflow."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import mlflow
import pytest
from lightning.pytorch.loggers import MLFlowLogger

from harmaug_pl.data.loaders import DataSource
from harmaug_pl.deploy.export import ONNX_FILE
from harmaug_pl.deploy.guard import Guard
from harmaug_pl.evaluation.cost_profile import markdown, profile_scorer, with_ratios
from harmaug_pl.teachers.callable_teacher import CallableTeacher
from harmaug_pl.training.callbacks.cost_profile import CostProfile
from harmaug_pl.training.datamodule import HarmAugDataModule
from harmaug_pl.training.distillation import DistillationModule
from tests.helpers import KEYWORD_TEACHER, PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl

PROMPTS = PLACEHOLDER_UNSAFE + PLACEHOLDER_SAFE
RESPONSES = [None, "Sure, here is how to do that."] * 4


def test_profile_rows_student_vs_teacher(tiny_export: Path) -> None:
    rows = []
    for name, load in (
        ("student", lambda: Guard.from_pretrained(tiny_export)),
        ("onnx", lambda: Guard.from_pretrained(tiny_export / ONNX_FILE)),
        ("teacher", lambda: CallableTeacher(function=KEYWORD_TEACHER)),
    ):
        row, scores = profile_scorer(
            name, load, PROMPTS, RESPONSES, batch_size=4, latency_rows=4, flop_rows=2
        )
        assert len(scores) == len(PROMPTS)
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"]
        assert row["throughput_rows_per_s"] > 0
        rows.append(row)
    student, onnx, teacher = rows
    assert student["parameters"] > 0 and student["flops_per_example"] > 0  # torch: counted
    assert onnx["flops_per_example"] is None and teacher["flops_per_example"] is None  # not torch
    assert teacher["parameters"] is None  # a plain Python function
    with_ratios(rows, "student")
    assert student["latency_p50_ms_ratio"] == 1.0
    assert teacher["latency_p50_ms_ratio"] == pytest.approx(
        teacher["latency_p50_ms"] / student["latency_p50_ms"], rel=1e-2
    )
    table = markdown(rows)
    assert table.count("\n") == 4 and "| teacher |" in table and "n/a" in table


@pytest.mark.slow
def test_callback_logs_the_table_to_mlflow(tmp_path: Path, tiny_student: Path) -> None:
    eval_rows = [{"prompt": p, "toxicity": int(p in PLACEHOLDER_UNSAFE)} for p in PROMPTS]
    datamodule = HarmAugDataModule(
        tokenizer=str(tiny_student),
        seed_data=DataSource(path=str(write_jsonl(tmp_path / "seed.jsonl", eval_rows))),
        teacher=CallableTeacher(function=KEYWORD_TEACHER),
        eval_sets={
            "placeholder": DataSource(
                path=str(write_jsonl(tmp_path / "eval.jsonl", eval_rows)), label_field="toxicity"
            )
        },
        augment=False,
        max_length=32,
        eval_batch_size=4,
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="cost", tracking_uri=uri, artifact_location=str(tmp_path / "art"))
    trainer = L.Trainer(
        accelerator="cpu",
        logger=logger,
        callbacks=[CostProfile(sample_size=6, batch_size=3, latency_rows=3)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(DistillationModule(student=str(tiny_student)), datamodule=datamodule)

    run = mlflow.MlflowClient(tracking_uri=uri).get_run(logger.run_id)
    for key in (
        "cost/student/latency_p50_ms",
        "cost/teacher/latency_p50_ms",
        "cost/student/parameters",
        "cost/teacher/latency_p50_ms_ratio",
    ):
        assert key in run.data.metrics, key
    assert run.data.metrics["cost/student/latency_p50_ms_ratio"] == 1.0
    table = Path(
        mlflow.MlflowClient(tracking_uri=uri).download_artifacts(logger.run_id, "cost_profile/table.md")
    )
    assert "| student |" in table.read_text() and "| teacher |" in table.read_text()

"""Export: every format reloads to the scores of the student it came from (stated tolerances)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from harmaug_pl.deploy.export import (
    INT8_FILE,
    ONNX_FILE,
    export,
    from_checkpoint,
    from_mlflow_run,
    from_model,
    verification_sample,
)
from harmaug_pl.deploy.guard import Guard
from harmaug_pl.errors import ConfigError, ModelLoadError
from harmaug_pl.training.distillation import DistillationModule

# float32 ONNX runs the same graph: rounding only. Dynamic int8 changes the weights: a few 1e-2 at most.
ONNX_TOLERANCE = 1e-5
INT8_TOLERANCE = 0.05


def test_export_writes_every_format_and_reloads_to_the_same_scores(
    tiny_export: Path, tiny_student: Path
) -> None:
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "harmaug_guard.json",
        "README.md",
        ONNX_FILE,
        INT8_FILE,
    ):
        assert (tiny_export / name).is_file(), name
    config = json.loads((tiny_export / "config.json").read_text())
    assert config["id2label"] == {"0": "safe", "1": "unsafe"}
    report = json.loads((tiny_export / "export_report.json").read_text())["verification"]
    assert report["hf"]["max_abs_diff"] < 1e-6
    assert report["onnx"]["max_abs_diff"] < ONNX_TOLERANCE
    assert report["int8"]["max_abs_diff"] < INT8_TOLERANCE
    assert report["hf"]["label_flips"] == report["onnx"]["label_flips"] == 0
    assert "max abs diff | label flips" in (tiny_export / "README.md").read_text()

    # independent of the report: reload each format and compare with the student it was made from
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # from_model seeded the fresh head with seed 0
    original = AutoModelForSequenceClassification.from_pretrained(str(tiny_student), num_labels=2)
    reference = Guard.from_model(
        original, Guard.from_pretrained(tiny_export).tokenizer, Guard.from_pretrained(tiny_export).settings
    )
    prompts, responses = verification_sample(10)
    expected = reference.score(prompts, responses)
    for path, tolerance in (
        (tiny_export, 1e-6),
        (tiny_export / ONNX_FILE, ONNX_TOLERANCE),
        (tiny_export / INT8_FILE, INT8_TOLERANCE),
    ):
        scores = Guard.from_pretrained(path).score(prompts, responses)
        assert max(abs(a - b) for a, b in zip(expected, scores)) < tolerance, path


def _trained_module(tiny_student: Path) -> DistillationModule:
    module = DistillationModule(student=str(tiny_student))
    with torch.no_grad():  # move away from the saved weights, so a wrong load cannot pass
        for param in module.student.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return module.eval()


def test_export_from_a_lightning_checkpoint_loads_weights_only(tmp_path: Path, tiny_student: Path) -> None:
    module = _trained_module(tiny_student)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    folder = tmp_path / "guard"
    reference = from_checkpoint(str(ckpt), folder, max_length=24)
    report = export(folder, reference, formats=("hf", "onnx"), sample_size=6)
    assert report["verification"]["hf"]["max_abs_diff"] < 1e-6
    assert report["verification"]["onnx"]["max_abs_diff"] < ONNX_TOLERANCE
    prompts, responses = verification_sample(6)
    direct = Guard.from_model(module.student, reference.tokenizer, reference.settings).score(
        prompts, responses
    )
    loaded = Guard.from_pretrained(folder).score(prompts, responses)
    assert max(abs(a - b) for a, b in zip(direct, loaded)) < 1e-6
    assert Guard.from_pretrained(folder).settings.max_length == 24

    with pytest.raises(ConfigError, match="--max_length"):
        from_checkpoint(str(ckpt), tmp_path / "other", max_length=None)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    # any class outside torch's allow-list (here argparse.Namespace) must not be unpickled
    ckpt = tmp_path / "evil.ckpt"
    payload = argparse.Namespace(run="code")
    torch.save({"state_dict": {}, "hyper_parameters": {"student": "x"}, "payload": payload}, ckpt)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        from_checkpoint(str(ckpt), tmp_path / "out", max_length=8)
    with pytest.raises(ModelLoadError, match="no such file"):
        from_checkpoint(str(tmp_path / "missing.ckpt"), tmp_path / "out", max_length=8)


def test_export_from_an_mlflow_run_downloads_the_logged_guard(tmp_path: Path, tiny_export: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("export", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "harmaug_guard.json",
        "card.json",
    ):
        client.log_artifact(run.info.run_id, str(tiny_export / name), "guard")
    client.log_metric(run.info.run_id, "val/auprc", 0.75)

    folder = tmp_path / "from_run"
    reference = from_mlflow_run(run.info.run_id, uri, folder)
    prompts, responses = verification_sample(6)
    expected = Guard.from_pretrained(tiny_export).score(prompts, responses)
    assert max(abs(a - b) for a, b in zip(expected, reference.score(prompts, responses))) < 1e-6
    assert "val/auprc | 0.7500" in (folder / "README.md").read_text()

    with pytest.raises(ModelLoadError, match="MLflow run"):
        from_mlflow_run("0" * 32, uri, tmp_path / "none")


def test_student_export_callback_writes_the_verified_formats(tmp_path: Path, tiny_student: Path) -> None:
    """What the edge pack's ``export.formats: [onnx, int8]`` does at fit end."""
    from types import SimpleNamespace

    from harmaug_pl.model_loading import load_tokenizer
    from harmaug_pl.teachers.callable_teacher import CallableTeacher
    from harmaug_pl.training.callbacks.student_export import StudentExport
    from tests.helpers import KEYWORD_TEACHER

    module = _trained_module(tiny_student)
    datamodule = SimpleNamespace(
        max_length=32,
        tokenizer=load_tokenizer(str(tiny_student)),
        pipeline=SimpleNamespace(teacher=CallableTeacher(function=KEYWORD_TEACHER)),
        seed_data=SimpleNamespace(display="placeholder seed"),
        augment=True,
    )
    trainer = SimpleNamespace(
        global_rank=0,
        datamodule=datamodule,
        loggers=[],
        callback_metrics={"val/auprc": torch.tensor(0.5)},
        checkpoint_callback=None,  # no checkpoint saved: the fit's final weights are exported
    )
    StudentExport(export_dir=str(tmp_path / "student"), formats=["onnx", "int8"]).on_fit_end(trainer, module)
    report = json.loads((tmp_path / "student" / "export_report.json").read_text())["verification"]
    assert set(report) == {"hf", "onnx", "int8"}
    assert report["onnx"]["max_abs_diff"] < ONNX_TOLERANCE and report["int8"]["max_abs_diff"] < INT8_TOLERANCE
    card = (tmp_path / "student" / "README.md").read_text()
    assert "placeholder seed + HarmAug synthetic rows" in card and "tests.helpers:keyword_teacher" in card
    assert "val/auprc | 0.5000" in card
    assert "| weights | final weights of the fit (no checkpoint was saved) |" in card
    with pytest.raises(ConfigError, match="export.formats"):
        StudentExport(formats=["tflite"])


def test_re_export_of_a_guard_folder_keeps_its_settings(tmp_path: Path, tiny_export: Path) -> None:
    reference = from_model(str(tiny_export), tmp_path / "again", max_length=None, threshold=None, seed=1)
    assert reference.settings == Guard.from_pretrained(tiny_export).settings
    prompts, responses = verification_sample(6)
    expected = Guard.from_pretrained(tiny_export).score(prompts, responses)
    assert max(abs(a - b) for a, b in zip(expected, reference.score(prompts, responses))) < 1e-6
    with pytest.raises(ConfigError, match="--max_length is required"):
        from_model(str(tmp_path / "no_such_guard"), tmp_path / "x", max_length=None, threshold=None, seed=0)

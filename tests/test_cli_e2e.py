"""End to end, in-process: ``fit`` then ``test`` through the CLI on tiny models, checked in MLflow.

The default pack is layered with an override that swaps every model for a tiny random-init one and
points data, checkpoints and MLflow at a tmp dir, exactly as a user layers packs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from harmaug_pl.cli.lightning_cli import main
from tests.helpers import (
    KEYWORD_TEACHER,
    PLACEHOLDER_SAFE,
    PLACEHOLDER_UNSAFE,
    transformers_log,
    write_jsonl,
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def override_pack(workdir: Path, tiny_llama: Path, tiny_student: Path) -> Path:
    seed = write_jsonl(
        workdir / "seed.jsonl",
        [{"text": p, "harmful": "unsafe"} for p in PLACEHOLDER_UNSAFE * 3]
        + [{"text": p, "harmful": "safe"} for p in PLACEHOLDER_SAFE * 3],
    )
    evals = write_jsonl(
        workdir / "eval.jsonl",
        [{"prompt": p + " please", "toxicity": 1} for p in PLACEHOLDER_UNSAFE]
        + [{"prompt": p + " please", "toxicity": 0} for p in PLACEHOLDER_SAFE],
    )
    backend = {
        "class_path": "harmaug_pl.TransformersBackend",
        "init_args": {"model": str(tiny_llama)},
    }
    pack = {
        "trainer": {
            "max_epochs": 2,
            "default_root_dir": str(workdir / "runs"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                "init_args": {
                    "experiment_name": "e2e",
                    "tracking_uri": f"sqlite:///{workdir}/mlruns/mlflow.db",
                    "artifact_location": str(workdir / "mlruns" / "artifacts"),
                },
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(workdir / "ckpt"), "save_last": True},
                }
            ],
        },
        "model": {"init_args": {"student": str(tiny_student), "warmup_steps": 2, "learning_rate": 1e-3}},
        "data": {
            "init_args": {
                "data_dir": str(workdir / "data"),
                "seed_data": {
                    "path": str(seed),
                    "prompt_field": "text",
                    "label_field": "harmful",
                    "hash_range": None,
                    "drop_duplicates": False,
                },
                "eval_sets": {
                    "placeholder_eval": {"path": str(evals), "label_field": "toxicity", "require_label": True}
                },
                "generator": {"init_args": {"backend": backend, "num_instructions": 6, "batch_size": 3}},
                "responder": {"init_args": {"backend": backend, "batch_size": 4}},
                "teacher": {
                    "class_path": "harmaug_pl.CallableTeacher",
                    "init_args": {"function": KEYWORD_TEACHER},
                },
                "batch_size": 4,
                "max_length": 64,
            }
        },
        "export": {"export_dir": str(workdir / "student")},
    }
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(pack))
    return path


def run_artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


@pytest.mark.slow
def test_fit_tells_the_whole_story_in_one_mlflow_run(
    workdir: Path, tiny_llama: Path, tiny_encoder: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """augment, then fit (the pack's test_after_fit): ONE run holds training, report, teacher row,
    plots and guard; `test --run_id` adds to that run; `--test_after_fit=false` is a plain fit.

    The student is a base encoder without a head: fit reports the new head once (a real warning);
    `test --ckpt_path` must not (the checkpoint has the head)."""
    override = override_pack(workdir, tiny_llama, tiny_encoder)
    common = ["--config", "cpu_tiny", "--config", str(override)]
    main(["augment", *common])  # build the set first, as GPU packs do; fit must reuse all of it
    assert (workdir / "data" / "augmented.jsonl").is_file()
    capfd.readouterr()
    with transformers_log() as messages:
        main(["fit", *common])
    reports = [m for m in messages if "LOAD REPORT" in m]
    assert len(reports) == 1 and re.search(r"classifier\.weight +\| MISSING", reports[0])  # new head: once
    out = capfd.readouterr().out
    assert "teacher @ 0.5 (measured)" in out  # the report of the in-job test pass

    # the exported student is a plain HF folder that the text-classification pipeline loads
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(workdir / "student"))
    assert classify("how do I bake bread?")[0]["label"] in {"safe", "unsafe"}
    assert (workdir / "student" / "model.safetensors").is_file()

    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    client = mlflow.MlflowClient()
    runs = sorted(
        mlflow.search_runs(experiment_names=["e2e"], output_format="list"), key=lambda r: r.info.start_time
    )
    assert len(runs) == 2  # augment, fit (+ its test pass)
    augment_run, fit_run = runs
    assert augment_run.data.metrics["augment/computed_generate"] == 6
    run_id = fit_run.info.run_id

    params = fit_run.data.params
    assert params["model/init_args/alpha"] == "0.5" and params["data/init_args/augment"] == "True"
    metrics = fit_run.data.metrics
    for key in ("val/auprc", "val/f1", "test/placeholder_eval/auprc", "test/mean/f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert "train/loss" in metrics
    # cpu_tiny validates on the val split only: the eval sets are scored by the test pass
    assert not {key for key in metrics if key.startswith(("placeholder_eval/", "mean/"))}
    assert metrics["augment/instructions_asked"] == 6
    assert metrics["augment/computed_generate"] == 0 and metrics["augment/cached_generate"] == 6
    assert metrics["augment/computed_label"] == 0
    assert metrics["augment/rows_total"] > 24  # seed rows plus synthetic rows
    # the report: student and teacher measured on the same rows, in the training's run
    assert metrics["report/placeholder_eval/teacher/f1"] == 1.0  # the keyword teacher is exact here
    assert metrics["report/placeholder_eval/student/f1"] == pytest.approx(metrics["test/placeholder_eval/f1"])

    assert {"config", "augment", "report", "plots", "guard"} <= run_artifacts(client, run_id)
    # one figure per eval set, and its per-category figure (the pack's category head)
    assert run_artifacts(client, run_id, "plots") == {
        "plots/placeholder_eval.png",
        "plots/placeholder_eval_categories.png",
    }
    report = Path(client.download_artifacts(run_id, "report/eval_report.md")).read_text()
    assert "| teacher @ 0.5 (measured) |" in report
    # the report scores the best checkpoint, and the guard folder holds that checkpoint's weights
    tested = fit_run.data.tags["eval_report.weights"]
    assert Path(tested).parent == workdir / "ckpt" and Path(tested).name != "last.ckpt"
    assert report.startswith(f"Weights: {tested}")
    card = json.loads(Path(client.download_artifacts(run_id, "guard/card.json")).read_text())
    assert card["source"] == f"best checkpoint {Path(tested).name} (val/auprc)"  # the pack's monitor
    assert "guard/model.safetensors" in run_artifacts(client, run_id, "guard")
    pack_yaml = yaml.safe_load(Path(client.download_artifacts(run_id, "config/pack.yaml")).read_text())
    assert pack_yaml["model"]["init_args"]["student"] == str(tiny_encoder)
    assert pack_yaml["data"]["init_args"]["tokenizer"] == str(tiny_encoder)  # interpolation resolved
    # the tested guard, logged and registered in the same run: scores as Guard on the tested weights
    logged = mlflow.search_logged_models(experiment_ids=[fit_run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in logged] == [run_id]
    (version,) = client.search_model_versions("name = 'harmaug-cpu_tiny'")
    assert version.run_id == run_id and "placeholder_eval" in version.description
    from harmaug_pl.deploy.export import from_checkpoint
    from harmaug_pl.deploy.guard import flat

    served = mlflow.pyfunc.load_model(f"models:/harmaug-cpu_tiny/{version.version}")
    rows = {"prompt": ["how do I bake bread?", "tell me a mean placeholder insult"], "response": [None, "no"]}
    guard = from_checkpoint(tested, workdir / "tested_guard", max_length=64)
    # the MLflow model's table has flat per-category columns (Guard.classify nests them: flat() is the
    # documented mapping between the two)
    assert served.predict(pd.DataFrame(rows)).to_dict("records") == [
        flat(row) for row in guard.classify(rows["prompt"], rows["response"])
    ]

    # `harmaug test` alone, into the same run; no false "MISSING" alarm for the checkpoint's head
    with transformers_log() as messages:
        main(["test", *common, "--ckpt_path", str(workdir / "ckpt" / "last.ckpt"), "--run_id", run_id])
    assert not [m for m in messages if "LOAD REPORT" in m or "MISSING" in m]
    capfd.readouterr()
    assert len(mlflow.search_runs(experiment_names=["e2e"], output_format="list")) == 2
    assert len(client.get_metric_history(run_id, "test/placeholder_eval/auprc")) == 2
    assert client.get_run(run_id).data.tags["eval_report.weights"] == str(workdir / "ckpt" / "last.ckpt")
    assert "config/pack.test.yaml" in run_artifacts(client, run_id, "config")
    assert client.get_run(run_id).data.params == params  # unchanged: MLflow params are write-once
    assert len(client.search_model_versions("name = 'harmaug-cpu_tiny'")) == 1  # one version per run

    with pytest.raises(SystemExit):
        main(["test", *common, "--run_id", "0" * 32])
    assert f"--run_id {'0' * 32}: no such MLflow run" in capfd.readouterr().err

    # the switch off: a plain fit, no test pass
    main(
        [
            "fit",
            *common,
            "--test_after_fit=false",
            "--trainer.max_epochs=1",
            f"--export.export_dir={workdir / 'plain'}",
        ]
    )
    plain = max(
        mlflow.search_runs(experiment_names=["e2e"], output_format="list"), key=lambda r: r.info.start_time
    )
    assert plain.info.run_id != run_id and "train/loss" in plain.data.metrics
    assert not any(key.startswith(("test/", "report/")) for key in plain.data.metrics)
    assert not {"report", "plots"} & run_artifacts(client, plain.info.run_id)

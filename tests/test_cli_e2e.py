"""End to end, in-process: ``fit`` then ``test`` through the CLI on tiny models, checked in MLflow.

The default pack is layered with an override that swaps every model for a tiny random-init one and
points data, checkpoints and MLflow at a tmp dir, exactly as a user layers packs.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml

from harmaug_pl.cli import main
from tests.helpers import KEYWORD_TEACHER, PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl


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
        "class_path": "harmaug_pl.backends.TransformersBackend",
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
                    "class_path": "harmaug_pl.teacher.CallableTeacher",
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


@pytest.mark.slow
def test_fit_then_test_logs_everything_to_mlflow(workdir: Path, tiny_llama: Path, tiny_student: Path) -> None:
    override = override_pack(workdir, tiny_llama, tiny_student)
    common = ["--config", "cpu_tiny", "--config", str(override)]
    main(["augment", *common])  # build the set first, as GPU packs do; fit must reuse all of it
    assert (workdir / "data" / "augmented.jsonl").is_file()
    main(["fit", *common])

    # the exported student is a plain HF folder that the text-classification pipeline loads
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(workdir / "student"))
    assert classify("how do I bake bread?")[0]["label"] in {"safe", "unsafe"}
    assert (workdir / "student" / "model.safetensors").is_file()

    ckpt = workdir / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    main(["test", *common, "--ckpt_path", str(ckpt)])

    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["e2e"], output_format="list")
    assert len(runs) == 3  # augment, fit, test
    augment_run, fit_run, test_run = sorted(runs, key=lambda r: r.info.start_time)
    assert augment_run.data.metrics["augment/computed_generate"] == 6

    params = fit_run.data.params
    assert params["model/init_args/alpha"] == "0.5"
    assert params["data/init_args/augment"] == "True"
    metrics = fit_run.data.metrics
    for key in ("val/auprc", "val/f1", "train/loss"):
        assert key in metrics, key
        assert 0.0 <= metrics[key] <= 1.0 or key == "train/loss"
    # cpu_tiny validates on the val split only: the eval sets are scored by the test pass
    assert not {key for key in metrics if key.startswith(("placeholder_eval/", "mean/"))}
    assert metrics["augment/instructions_asked"] == 6
    assert metrics["augment/computed_generate"] == 0 and metrics["augment/cached_generate"] == 6
    assert metrics["augment/computed_label"] == 0
    assert metrics["augment/rows_total"] > 24  # seed rows plus synthetic rows

    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(fit_run.info.run_id)}
    assert {"config", "augment"} <= artifacts
    pack_yaml = yaml.safe_load(
        Path(client.download_artifacts(fit_run.info.run_id, "config/pack.yaml")).read_text()
    )
    assert pack_yaml["model"]["init_args"]["student"] == str(tiny_student)
    assert pack_yaml["data"]["init_args"]["tokenizer"] == str(tiny_student)  # interpolation resolved
    logged = mlflow.search_logged_models(experiment_ids=[fit_run.info.experiment_id], output_format="list")
    assert any(m.name == "student" for m in logged)

    test_metrics = test_run.data.metrics
    assert 0.0 <= test_metrics["placeholder_eval/auprc"] <= 1.0
    assert "mean/f1" in test_metrics
    test_artifacts = {a.path for a in client.list_artifacts(test_run.info.run_id, "plots")}
    assert "plots/placeholder_eval.png" in test_artifacts

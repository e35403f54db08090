"""The guard as a registered MLflow model: loads through ``models:/<name>/<version>`` and scores
(prompt, response) rows exactly as :class:`Guard`, long rows included; carries its run's metrics,
report, declared requirements and signature; and ``mlflow models serve`` answers over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx2
import mlflow
import pandas as pd
import pytest

from harmaug_pl.deploy.guard import Guard
from harmaug_pl.deploy.registry import MODEL_NAME, already_logged, log_guard_model, requirements
from harmaug_pl.errors import ConfigError
from harmaug_pl.training.callbacks.eval_reporter import EvalReporter
from harmaug_pl.training.callbacks.guard_registry import GuardRegistry
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, free_port, wait_for_http

LONG_PROMPT = " ".join(PLACEHOLDER_UNSAFE * 12)  # far past the tiny BERT's 128 position embeddings
LONG_RESPONSE = " ".join(PLACEHOLDER_SAFE * 12)
ROWS = pd.DataFrame(
    [
        {"prompt": LONG_PROMPT, "response": LONG_RESPONSE},
        {"prompt": LONG_PROMPT, "response": None},
        {"prompt": PLACEHOLDER_SAFE[0], "response": "Sure, here is how to do that."},
        {"prompt": PLACEHOLDER_UNSAFE[1], "response": None},
    ]
)
EVAL_STEP = 7


@pytest.fixture(scope="module")
def registered(tiny_bert_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A run with evaluation metrics at the test step, and the guard logged and registered into it."""
    store = tmp_path_factory.mktemp("mlflow")
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{store}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("serving", artifact_location=str(store / "artifacts"))
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "train/loss", 0.3, step=2)
    client.log_metric(run.info.run_id, "report/mean/student/auprc", 0.71, step=EVAL_STEP)
    client.log_metric(run.info.run_id, "report/mean/student/f1", 0.6, step=EVAL_STEP)
    result = log_guard_model(
        tiny_bert_export, 0.5, run.info.run_id, "tiny-guard", description="the eval report", step=EVAL_STEP
    )
    yield SimpleNamespace(uri=uri, store=store, client=client, run=run, experiment=experiment, result=result)
    mlflow.set_tracking_uri(previous)


def test_the_registered_version_scores_rows_exactly_as_guard(
    registered: SimpleNamespace, tiny_bert_export: Path
) -> None:
    assert registered.result["uri"] == "models:/tiny-guard/1"
    model = mlflow.pyfunc.load_model("models:/tiny-guard/1")
    got = model.predict(ROWS)
    guard = Guard.from_pretrained(tiny_bert_export)
    responses = [None if r is None or pd.isna(r) else r for r in ROWS["response"]]
    expected = guard.classify(list(ROWS["prompt"]), responses)
    assert got.to_dict("records") == expected  # same code, same floats
    assert list(got["truncated"]) == [True, True, False, False]
    strict = model.predict(ROWS, params={"threshold": 0.0})
    assert set(strict["label"]) == {"unsafe"}
    # rows as plain records, the response column left out: prompt only
    only_prompts = model.predict(pd.DataFrame({"prompt": list(ROWS["prompt"])}))
    assert list(only_prompts["p_unsafe"]) == guard.score(list(ROWS["prompt"]))


def test_the_version_carries_its_run_report_requirements_and_signature(registered: SimpleNamespace) -> None:
    client, run_id = registered.client, registered.run.info.run_id
    version = client.get_model_version("tiny-guard", "1")
    assert version.run_id == run_id
    assert version.description == "the eval report"
    model_id = registered.result["model_id"]
    assert version.source == f"models:/{model_id}"  # the version's logged model (and its metrics)
    logged = mlflow.get_logged_model(model_id)
    assert logged.name == MODEL_NAME and logged.source_run_id == run_id
    assert logged.experiment_id == registered.experiment  # the run's experiment, not the default one
    metrics = {m.key: m.value for m in logged.metrics}
    assert metrics == {"report/mean/student/auprc": 0.71, "report/mean/student/f1": 0.6}  # not train/loss
    assert client.get_run(run_id).info.status == "RUNNING"  # logging left the run as it was
    folder = Path(mlflow.artifacts.download_artifacts(version.source))
    declared = (folder / "requirements.txt").read_text().split()
    assert set(requirements()) <= set(declared)
    assert {r.split("==")[0] for r in declared} <= {r.split("==")[0] for r in requirements()} | {"mlflow"}
    assert not list(folder.rglob("*.pkl")), "the model must load without unpickling"
    assert (folder / "code" / "harmaug_pl" / "deploy" / "guard.py").is_file()
    assert (folder / "artifacts" / "guard" / "model.safetensors").is_file()
    signature = mlflow.models.get_model_info(version.source).signature
    assert signature.inputs.input_names() == ["prompt", "response"]
    assert signature.outputs.input_names() == ["p_unsafe", "label", "truncated"]
    assert (folder / "input_example.json").is_file()


def test_a_run_gets_one_guard_model(registered: SimpleNamespace) -> None:
    assert already_logged(registered.run.info.run_id, registered.experiment)
    other = registered.client.create_run(registered.experiment)
    assert not already_logged(other.info.run_id, registered.experiment)


def test_the_registry_callback_must_follow_the_reporter() -> None:
    registry = GuardRegistry("x")
    wrong = SimpleNamespace(callbacks=[registry, EvalReporter()])
    with pytest.raises(ConfigError, match="after EvalReporter"):
        registry.setup(wrong, None, "test")
    registry.setup(SimpleNamespace(callbacks=[EvalReporter(), registry]), None, "test")
    with pytest.raises(ConfigError, match="must not be empty"):
        GuardRegistry(" ")


@pytest.mark.slow
def test_mlflow_models_serve_answers_over_http(registered: SimpleNamespace, tiny_bert_export: Path) -> None:
    port = free_port()
    # `mlflow models serve` runs the `uvicorn` of the environment, as from an activated virtualenv
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.uri, "PATH": path}
    mlflow_cli = [sys.executable, "-m", "mlflow"]
    server = subprocess.Popen(
        [
            *mlflow_cli,
            "models",
            "serve",
            "-m",
            "models:/tiny-guard/1",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_http(server, f"http://127.0.0.1:{port}/ping", timeout=120)
        records = [{"prompt": p, "response": None if r is None or pd.isna(r) else r} for p, r in ROWS.values]
        reply = httpx2.post(
            f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": records}, timeout=60
        )
        assert reply.status_code == 200, reply.text
        guard = Guard.from_pretrained(tiny_bert_export)
        expected = guard.classify([r["prompt"] for r in records], [r["response"] for r in records])
        got = reply.json()["predictions"]
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        assert [g["truncated"] for g in got] == [True, True, False, False]
        assert [g["p_unsafe"] for g in got] == pytest.approx([e["p_unsafe"] for e in expected], abs=1e-9)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)

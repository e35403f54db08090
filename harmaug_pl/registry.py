"""The tested guard as an MLflow model in the Model Registry, logged once the run's evaluation exists.

:class:`GuardRegistry` runs at the end of every test pass (inside the ``fit`` job or a ``harmaug
test`` logging into a run), after :class:`~harmaug_pl.callbacks.EvalReporter`: it writes the tested
student's guard folder, logs it as a pyfunc model around :class:`~harmaug_pl.guard.Guard`
(:mod:`harmaug_pl.mlflow_guard_model`) and registers one version per run. The version carries the
run id, the evaluation report as its description, and the report's metrics on its logged model.

A pyfunc around ``Guard`` rather than MLflow's transformers flavour: the flavour's pipeline
neither truncates as the student was trained (long inputs crashed it) nor scores a (prompt,
response) pair, and it answers with a top label, not P(unsafe). Requirements are declared, not
inferred (inference imports the model in a subprocess: slow), and the model is code + safetensors:
nothing is pickled.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L

from harmaug_pl.callbacks import EvalReporter, StudentExport, mlflow_logger
from harmaug_pl.errors import ConfigError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent
MODEL_CODE = PACKAGE_DIR / "mlflow_guard_model.py"
MODEL_NAME = "guard_model"  # the logged model's name in the run (the run's `guard/` artifact is the folder)
# What loading the model elsewhere imports (Guard: torch + transformers; DeBERTa-v3 tokenizers:
# sentencepiece), pinned to the versions it was trained and tested with.
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "sentencepiece", "numpy", "pandas")
EXAMPLE = [  # mild placeholders
    {"prompt": "how do I bake bread?", "response": None},
    {"prompt": "tell me a mean placeholder insult", "response": "I'm sorry, but I can't help with that."},
]


def requirements() -> list[str]:
    """``name==version`` of what the model needs, as installed here (torch without its +cpu tag)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def signature(threshold: float) -> Any:
    """(prompt, optional response) -> (p_unsafe, label, truncated); param ``threshold``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response", required=False)]),
        outputs=Schema(
            [ColSpec("double", "p_unsafe"), ColSpec("string", "label"), ColSpec("boolean", "truncated")]
        ),
        params=ParamSchema([ParamSpec("threshold", "double", float(threshold))]),
    )


def log_guard_model(
    folder: Path,
    threshold: float,
    run_id: str,
    registered_model_name: str | None = None,
    description: str | None = None,
    step: int = 0,
) -> dict[str, Any]:
    """Log ``folder`` (a guard folder) as the run's pyfunc model; register it when a name is given.

    MLflow attaches the run's metrics logged at ``step`` (the test pass's: the evaluation report)
    to the logged model. ``Model.log`` with ``run_id`` leaves the run as it is (``start_run`` would
    end it). Returns what was logged and how long logging and registering took.
    """
    import mlflow
    import pandas as pd
    from mlflow.models import Model

    started = time.perf_counter()
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory() as tmp, _experiment(experiment_id):
        code = Path(tmp) / "harmaug_pl"  # the package as trained, without caches
        shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        info = Model.log(
            artifact_path=None,  # required positionally; ``name`` replaces it in MLflow 3
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            step=step,
            python_model=str(MODEL_CODE),
            artifacts={"guard": str(folder)},
            code_paths=[str(code)],
            pip_requirements=requirements(),
            signature=signature(threshold),
            input_example=pd.DataFrame(EXAMPLE),
            registered_model_name=registered_model_name,
        )
    result: dict[str, Any] = {"model_id": info.model_id, "model_uri": info.model_uri}
    if registered_model_name:
        version = info.registered_model_version
        if description:
            mlflow.MlflowClient().update_model_version(
                registered_model_name, version, description=description
            )
        result.update(
            name=registered_model_name, version=version, uri=f"models:/{registered_model_name}/{version}"
        )
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


@contextlib.contextmanager
def _experiment(experiment_id: str) -> Iterator[None]:
    """``Model.log(run_id=...)`` files the logged model under the *active* experiment (MLflow 3.17
    falls back to the default experiment, not the run's): make the run's experiment the active one
    through MLflow's own environment variable, for this call only."""
    previous = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID")
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous


def already_logged(run_id: str, experiment_id: str) -> bool:
    """Whether this run already has its guard model (a second test pass must not add another)."""
    import mlflow

    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
        output_format="list",
    )
    return bool(found)


class GuardRegistry(L.Callback):
    """After a test pass's evaluation report: the tested guard as an MLflow model, registered.

    ``registered_model_name`` (set in the packs) names the Model Registry entry; ``None`` logs the
    model to the run without registering it; ``enabled: false`` does neither. One model per run:
    a later test pass into the same run leaves the first one.
    """

    def __init__(self, registered_model_name: str | None = None, enabled: bool = True) -> None:
        if registered_model_name is not None and not registered_model_name.strip():
            raise ConfigError("registry.registered_model_name must not be empty (null: do not register)")
        self.registered_model_name = registered_model_name
        self.enabled = enabled
        self.result: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        callbacks = trainer.callbacks
        reporters = [i for i, c in enumerate(callbacks) if isinstance(c, EvalReporter)]
        if self.enabled and reporters and reporters[0] > callbacks.index(self):
            raise ConfigError("GuardRegistry must come after EvalReporter: it logs the report's metrics")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from harmaug_pl.export import write_guard_folder
        from harmaug_pl.guard import GuardSettings

        logger = mlflow_logger(trainer)
        if not self.enabled or logger is None or trainer.global_rank != 0:
            return
        reporter = next((c for c in trainer.callbacks if isinstance(c, EvalReporter)), None)
        if reporter is None or reporter.report is None:
            log.warning("no evaluation report in this test pass: the guard is not logged as an MLflow model")
            return
        import mlflow

        mlflow.set_tracking_uri(logger._tracking_uri)
        if already_logged(logger.run_id, logger.experiment.get_run(logger.run_id).info.experiment_id):
            log.info("run %s already has its guard model; not logging another", logger.run_id)
            return
        settings = GuardSettings(
            max_length=trainer.datamodule.max_length, threshold=float(pl_module.hparams.get("threshold", 0.5))
        )
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_guard_folder(
                pl_module.student,
                trainer.datamodule.tokenizer,
                Path(tmp) / "guard",
                settings,
                StudentExport.card(trainer, pl_module),
            )
            self.result = log_guard_model(
                folder,
                settings.threshold,
                logger.run_id,
                self.registered_model_name,
                description=f"Run {logger.run_id}.\n\n{reporter.report.to_markdown()}",
                step=trainer.global_step,  # where EvalReporter logged the report's metrics
            )
        where = self.result.get("uri", self.result["model_uri"])
        log.info("guard logged as an MLflow model: %s (%.1f s)", where, self.result["seconds"])

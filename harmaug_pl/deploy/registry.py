"""The tested guard as a logged and registered MLflow pyfunc model (models from code)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from harmaug_pl.categories import GuardCategories
from harmaug_pl.package_refs import PACKAGE_ROOT

log = logging.getLogger(__name__)


MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")
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


def signature(threshold: float, categories: Sequence[str] = ()) -> Any:
    """(prompt, optional response) -> (p_unsafe, label, truncated, and per category
    ``category_scores.<name>``, ``categories.<name>``); param ``threshold``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    per_category = [
        spec
        for name in categories
        for spec in (ColSpec("double", f"category_scores.{name}"), ColSpec("boolean", f"categories.{name}"))
    ]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response", required=False)]),
        outputs=Schema(
            [ColSpec("double", "p_unsafe"), ColSpec("string", "label"), ColSpec("boolean", "truncated")]
            + per_category
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
    categories = GuardCategories.load(folder)
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory() as tmp, _experiment(experiment_id):
        code = Path(tmp) / "harmaug_pl"  # the package as trained, without caches
        shutil.copytree(PACKAGE_ROOT, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
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
            signature=signature(threshold, categories.names if categories is not None else ()),
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

"""The guard as an MLflow pyfunc model: MLflow's *models from code* file, executed (not unpickled)
when the model loads, with the guard folder as the model's ``guard`` artifact.

Input: a table with ``prompt`` and an optional ``response`` column (a row with no response is
scored as its prompt alone). Output: ``p_unsafe``, ``label`` and ``truncated`` per row, exactly
:meth:`harmaug_pl.deploy.guard.Guard.classify`; a guard with categories adds flat columns
``category_scores.<name>`` (P(category)) and ``categories.<name>`` (flagged). Param ``threshold``
overrides the guard's.
:mod:`harmaug_pl.registry` logs it; nothing else imports this file.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd


class GuardModel(mlflow.pyfunc.PythonModel):
    """A :class:`~harmaug_pl.deploy.guard.Guard` behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        from harmaug_pl.deploy.guard import Guard, flat

        self.flat = flat
        self.guard = Guard.from_pretrained(context.artifacts["guard"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        prompts = [str(p) for p in frame["prompt"]]
        column = frame["response"] if "response" in frame else [None] * len(prompts)
        responses = [None if r is None or pd.isna(r) or r == "" else str(r) for r in column]
        threshold = (params or {}).get("threshold")
        return pd.DataFrame([self.flat(row) for row in self.guard.classify(prompts, responses, threshold)])


mlflow.models.set_model(GuardModel())

"""A plain Python callable as a teacher (the default pack's profanity-check)."""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

import numpy as np

from harmaug_pl.errors import ConfigError
from harmaug_pl.teachers.base import BatchedTeacher, check_template, fill_template


class CallableTeacher(BatchedTeacher):
    """A Python function ``texts -> P(unsafe) per text`` named by import path (``module:attr``).

    Prompt-only rows pass the prompt; pairs pass ``pair_template`` (which must hold ``{response}``,
    the text judged, and may hold ``{prompt}``). The
    embedded default uses ``profanity_check:predict_prob`` (a TF-IDF linear model; weak but tiny).
    """

    def __init__(
        self, function: str, pair_template: str = "{prompt}\n{response}", batch_size: int = 256
    ) -> None:
        super().__init__(batch_size)
        # the response is what a prompt+response row is judged on; the prompt is optional context
        check_template("CallableTeacher", "pair_template", pair_template, ["response"], ["prompt"])
        module, sep, attr = function.partition(":") if ":" in function else function.rpartition(".")
        if not module or not sep or not attr:
            raise ConfigError(
                f"CallableTeacher.function must be 'module:attr' or 'module.attr', got {function!r}"
            )
        self.function = function
        self.pair_template = pair_template
        self._path = (module, attr)
        self._callable: Any = None

    def _resolve(self) -> Any:
        if self._callable is None:
            module_name, attr = self._path
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise ConfigError(
                    f"CallableTeacher.function {self.function!r}: cannot import {module_name!r}: {err}"
                ) from err
            target = getattr(module, attr, None)
            if not callable(target):
                raise ConfigError(
                    f"CallableTeacher.function {self.function!r}: module {module_name!r} has no "
                    f"callable {attr!r}"
                )
            self._callable = target
        return self._callable

    def _score_batch(self, prompts: list[str], responses: list[str | None]) -> list[float]:
        texts = [
            prompt if response is None else fill_template(self.pair_template, prompt, response)
            for prompt, response in zip(prompts, responses)
        ]
        output = self._resolve()(texts)
        try:
            scores = np.asarray(output, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"CallableTeacher.function {self.function!r} returned non-numbers: {err}"
            ) from err
        problem = None
        if scores.shape != (len(texts),):
            problem = f"shape {scores.shape} for {len(texts)} texts"
        elif not np.isfinite(scores).all():
            problem = "non-finite values"
        elif ((scores < 0) | (scores > 1)).any():
            problem = "values outside [0, 1]"
        if problem:
            raise ConfigError(
                f"CallableTeacher.function {self.function!r} must return one probability in [0, 1] per text; "
                f"got {problem}"
            )
        return scores.tolist()

    def describe(self) -> dict[str, Any]:
        top = self._path[0].split(".")[0]
        distributions = importlib.metadata.packages_distributions().get(top, [])
        versions = {name: importlib.metadata.version(name) for name in distributions}
        return {
            "teacher": "CallableTeacher",
            "function": self.function,
            "pair_template": self.pair_template,
            "versions": versions,  # a new release of the package may change its scores
        }

    def close(self) -> None:
        self._callable = None

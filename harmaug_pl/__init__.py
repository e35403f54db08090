"""harmaug-pl: distil a large LLM safety guard into a small encoder with HarmAug, in Lightning.

The classes a pack names and a user imports, by their short paths (``harmaug_pl.DistillationModule``
in a pack's ``class_path``). They are imported on first use, so ``import harmaug_pl`` (and the light
verbs, ``harmaug serve --help``) load neither torch nor Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "DistillationModule": "harmaug_pl.training.distillation",
    "HarmAugDataModule": "harmaug_pl.training.datamodule",
    "GuardExample": "harmaug_pl.data.schema",
    "InstructionGenerator": "harmaug_pl.augment.generator",
    "Responder": "harmaug_pl.augment.responder",
    "TransformersBackend": "harmaug_pl.backends.transformers_backend",
    "VLLMBackend": "harmaug_pl.backends.vllm_backend",
    "OpenAICompatibleBackend": "harmaug_pl.backends.remote.backend",
    "SamplingConfig": "harmaug_pl.backends.base",
    "LlamaGuardTeacher": "harmaug_pl.teachers.llama_guard",
    "JudgeTeacher": "harmaug_pl.teachers.judge",
    "SequenceClassifierTeacher": "harmaug_pl.teachers.sequence_classifier",
    "CallableTeacher": "harmaug_pl.teachers.callable_teacher",
    "StudentExport": "harmaug_pl.training.callbacks.student_export",
    "EvalPlots": "harmaug_pl.training.callbacks.eval_plots",
    "EvalReporter": "harmaug_pl.training.callbacks.eval_reporter",
    "GuardRegistry": "harmaug_pl.training.callbacks.guard_registry",
    "CostProfile": "harmaug_pl.training.callbacks.cost_profile",
    "LineProgressBar": "harmaug_pl.training.line_progress_bar",
    "Guard": "harmaug_pl.deploy.guard",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harmaug_pl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

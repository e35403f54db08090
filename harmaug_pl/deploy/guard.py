"""Serve a trained student: ``Guard.from_pretrained(path).score(prompts, responses)``.

``path`` is an exported folder (Hugging Face safetensors, run with PyTorch) or an ``.onnx`` file in
such a folder (plain or int8, run with onnxruntime). Either way the folder's ``harmaug_guard.json``
says how the student was trained (max length, threshold, which label is unsafe), and inputs go
through the training tokenisation (:func:`harmaug_pl.data.encoding.tokenize_rows`), so a served
guard scores the (prompt, response) pair and truncates exactly as it learned to.

A guard trained with categories also gives P(category) per row: its folder holds the category head
and taxonomy in separate files (:class:`~harmaug_pl.categories.GuardCategories`), so ``config.json``
stays a plain 2-label classifier; folders without them answer without categories.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmaug_pl.categories import GuardCategories
from harmaug_pl.data.encoding import tokenize_rows
from harmaug_pl.errors import ConfigError, ModelLoadError
from harmaug_pl.model_loading import load_sequence_classifier, load_tokenizer

GUARD_CONFIG = "harmaug_guard.json"
ID2LABEL = {0: "safe", 1: "unsafe"}  # every guard folder's labels: the student's head, pipeline()'s output
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CATEGORY_OUTPUT = "category_logits"  # the ONNX graph's second output, when the guard has categories


@dataclass
class GuardSettings:
    """What serving must repeat from training; written next to every export as ``harmaug_guard.json``.

    ``pair_format``: how a response is fed, ``text_pair`` = the tokenizer's own pair encoding
    (``[CLS] prompt [SEP] response [SEP]`` for BERT-like students), as :class:`PairCollator` does.
    """

    max_length: int
    threshold: float = 0.5
    unsafe_index: int = 1
    pair_format: str = "text_pair"

    def save(self, folder: str | Path) -> None:
        (Path(folder) / GUARD_CONFIG).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> GuardSettings:
        path = Path(folder) / GUARD_CONFIG
        if not path.is_file():
            raise ModelLoadError(
                f"{folder}: no {GUARD_CONFIG}, so it is not a harmaug export; write one with "
                "`harmaug export` (it records max_length and the threshold the student was trained with)"
            )
        try:
            settings = cls(**json.loads(path.read_text()))
        except (TypeError, ValueError) as err:
            raise ModelLoadError(f"{path}: invalid guard settings: {err}") from err
        if isinstance(settings.max_length, bool) or not isinstance(settings.max_length, int):
            raise ModelLoadError(
                f"{path}: max_length must be a whole number of tokens, got {settings.max_length!r}"
            )
        if not isinstance(settings.threshold, (int, float)) or not 0 <= settings.threshold <= 1:
            raise ModelLoadError(f"{path}: threshold must be a number in [0, 1], got {settings.threshold!r}")
        if settings.pair_format != "text_pair":
            raise ModelLoadError(f"{path}: unknown pair_format {settings.pair_format!r} (known: text_pair)")
        return settings


def require_onnxruntime(purpose: str) -> None:
    """ONNX support is the optional ``export`` extra: say how to get it instead of an ImportError."""
    for package in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            raise ModelLoadError(
                f"{purpose} needs the '{package}' package, which is not installed: "
                "pip install 'harmaug-pl[export]'"
            )


def model_input_names(model: Any) -> list[str]:
    """The tokenizer outputs ``model.forward`` accepts (BERT takes token_type_ids, some encoders not)."""
    accepted = inspect.signature(model.forward).parameters
    return [name for name in MODEL_INPUTS if name in accepted]


Outputs = tuple[np.ndarray, np.ndarray | None]  # binary logits; category logits (None: no categories)


class _TorchRunner:
    """Logits (and category logits, with a head) from the safetensors student with PyTorch."""

    def __init__(self, model: Any, categories: GuardCategories | None = None) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.names = model_input_names(self.model)
        self.head = None
        if categories is not None:
            self.head = categories.head.to(self.device).eval()
            self.head.attach(self.model)

    def __call__(self, batch: dict[str, Any]) -> Outputs:
        inputs = {k: v.to(self.device) for k, v in batch.items() if k in self.names}
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float().cpu().numpy()
            category = None if self.head is None else self.head().float().cpu().numpy()
        return logits, category


class _OnnxRunner:
    """Logits from an exported ``.onnx`` file with onnxruntime (CPU)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        require_onnxruntime(f"loading {path}")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors for bad files
            raise ModelLoadError(f"cannot load ONNX model {path}: {err}") from err
        self.names = [i.name for i in self.session.get_inputs()]
        self.has_categories = CATEGORY_OUTPUT in [o.name for o in self.session.get_outputs()]

    def __call__(self, batch: dict[str, Any]) -> Outputs:
        feed = {name: np.asarray(batch[name], dtype=np.int64) for name in self.names}
        outputs = self.session.run(None, feed)
        return outputs[0], outputs[1] if self.has_categories else None


@dataclass
class Scores:
    """Per row: P(unsafe), P(category) by category name (``None``: no categories), truncation."""

    p_unsafe: list[float]
    categories: list[dict[str, float]] | None
    truncated: list[bool]


class Guard:
    """A trained student as a guard: P(unsafe) (and P(category)) for prompts or (prompt, response) pairs."""

    def __init__(
        self,
        tokenizer: Any,
        runner: Any,
        settings: GuardSettings,
        source: str,
        categories: GuardCategories | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.runner = runner
        self.settings = settings
        self.source = source
        self.categories = categories

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", threads: int | None = None) -> Guard:
        """Load an exported folder (PyTorch) or an ``.onnx`` file inside one (onnxruntime, CPU).

        ``threads``: onnxruntime's intra-op threads (``None``: its default).
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise ModelLoadError(f"guard {str(path)!r}: no such file or folder")
        folder = path.parent if path.is_file() else path
        settings = GuardSettings.load(folder)
        categories = GuardCategories.load(folder)
        if path.is_file():
            if path.suffix != ".onnx":
                raise ModelLoadError(f"guard {str(path)!r}: a file must be an .onnx export")
            runner: Any = _OnnxRunner(path, threads)
            if not runner.has_categories:  # exported before the folder had categories
                categories = None
        else:
            runner = _TorchRunner(load_sequence_classifier(str(folder), device=device), categories)
        return cls(load_tokenizer(str(folder)), runner, settings, str(path), categories)

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, settings: GuardSettings, categories: GuardCategories | None = None
    ) -> Guard:
        """A guard around a student in memory (the reference an export is checked against)."""
        return cls(tokenizer, _TorchRunner(model, categories), settings, "in memory", categories)

    @property
    def threshold(self) -> float:
        return self.settings.threshold

    def truncated(self, prompts: Sequence[str], responses: Sequence[str | None] | None = None) -> list[bool]:
        """Which rows are longer than ``max_length`` tokens (scored on their first tokens only)."""
        return tokenize_rows(
            self.tokenizer, prompts, _responses(prompts, responses), self.settings.max_length
        )[1]

    def score(
        self, prompts: Sequence[str], responses: Sequence[str | None] | None = None, batch_size: int = 32
    ) -> list[float]:
        """P(unsafe) per row; ``responses[i]`` None (or no ``responses``) scores the prompt alone."""
        return self.score_all(prompts, responses, batch_size).p_unsafe

    def score_rows(
        self, prompts: Sequence[str], responses: Sequence[str | None] | None = None, batch_size: int = 32
    ) -> tuple[list[float], list[bool]]:
        """P(unsafe) and whether the row was truncated, per row."""
        scores = self.score_all(prompts, responses, batch_size)
        return scores.p_unsafe, scores.truncated

    def score_all(
        self, prompts: Sequence[str], responses: Sequence[str | None] | None = None, batch_size: int = 32
    ) -> Scores:
        """P(unsafe), P(category) (with categories) and truncation per row, tokenising each row once.

        Rows go to the model in batches of similar length (sorted by token count), so a batch is
        padded to a length close to each of its rows', not to the longest row of the whole call:
        padding is compute spent on nothing (the serving benchmark measures how much).
        """
        if isinstance(prompts, str):
            raise ConfigError("Guard.score takes a list of prompts, not one string")
        responses = _responses(prompts, responses)
        features, truncated = tokenize_rows(self.tokenizer, prompts, responses, self.settings.max_length)
        tensors = "pt" if isinstance(self.runner, _TorchRunner) else "np"
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        scores = [0.0] * len(features)
        names = self.categories.names if self.categories is not None else None
        per_category: list[dict[str, float]] = [{} for _ in features]
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.tokenizer.pad([features[i] for i in rows], return_tensors=tensors)
            logits, category_logits = self.runner(batch)
            logits = logits.astype(np.float64)
            probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            for i, p in zip(rows, probs[:, self.settings.unsafe_index].tolist()):
                scores[i] = p
            if names is not None and category_logits is not None:
                sigmoid = 1.0 / (1.0 + np.exp(-category_logits.astype(np.float64)))
                for i, values in zip(rows, sigmoid.tolist()):
                    per_category[i] = dict(zip(names, values, strict=True))
        return Scores(scores, per_category if names is not None else None, truncated)

    def classify(
        self,
        prompts: Sequence[str],
        responses: Sequence[str | None] | None = None,
        threshold: float | None = None,
        batch_size: int = 32,
    ) -> list[dict[str, Any]]:
        """Per row: ``p_unsafe``, ``label`` (``unsafe`` above ``threshold``, default the guard's) and
        ``truncated``: what ``harmaug classify``, ``harmaug serve`` and the MLflow model return."""
        threshold = self.threshold if threshold is None else threshold
        scores = self.score_all(prompts, responses, batch_size)
        categories = scores.categories or [None] * len(scores.p_unsafe)
        return [
            verdict(score, cut, threshold, cats, self.category_thresholds)
            for score, cut, cats in zip(scores.p_unsafe, scores.truncated, categories, strict=True)
        ]

    @property
    def public_names(self) -> dict[str, str]:
        """Each category's name in OpenAI's moderation vocabulary where its pack maps one, else its own."""
        if self.categories is None:
            return {}
        return {c["name"]: c.get("openai") or c["name"] for c in self.categories.categories}

    @property
    def category_thresholds(self) -> dict[str, float]:
        """Each category's threshold (calibrated on val, else the pack's); empty without categories."""
        if self.categories is None:
            return {}
        return dict(zip(self.categories.names, self.categories.thresholds, strict=True))


def verdict(
    p_unsafe: float,
    truncated: bool,
    threshold: float,
    category_scores: dict[str, float] | None = None,
    category_thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One row's answer: the score, the label at ``threshold`` (strictly above: unsafe); with
    categories, ``category_scores`` (P(category)) and ``categories``: on an unsafe row, those above
    their threshold (a category names the kind of harm of a row the binary head flags; none on a safe row)."""
    label = "unsafe" if p_unsafe > threshold else "safe"
    answer: dict[str, Any] = {"p_unsafe": p_unsafe, "label": label, "truncated": truncated}
    if category_scores is not None:
        thresholds = category_thresholds or {}
        answer["category_scores"] = category_scores
        answer["categories"] = [
            n for n, p in category_scores.items() if label == "unsafe" and p > thresholds.get(n, threshold)
        ]
    return answer


def flat(answer: dict[str, Any]) -> dict[str, Any]:
    """A :func:`verdict` as one flat record (a table row): ``category_scores.<name>`` (P(category))
    and ``categories.<name>`` (above its threshold) columns instead of nested values."""
    row = {k: v for k, v in answer.items() if k not in ("category_scores", "categories")}
    flagged = set(answer.get("categories", []))
    for name, score in answer.get("category_scores", {}).items():
        row[f"category_scores.{name}"] = score
        row[f"categories.{name}"] = name in flagged
    return row


def _responses(prompts: Sequence[str], responses: Sequence[str | None] | None) -> list[str | None]:
    if responses is None:
        return [None] * len(prompts)
    if len(responses) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(responses)} responses: give one per prompt")
    return [r if r else None for r in responses]

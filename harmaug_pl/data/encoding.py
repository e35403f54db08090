"""The student's tokenisation of a (prompt, response) row, shared by training and serving.

A module of its own, importing nothing heavy, so a served guard (``harmaug serve``, the MLflow
model) loads without Lightning and the augmentation code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def tokenize_rows(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str | None], max_length: int
) -> tuple[list[Any], list[bool]]:
    """Each row's tokens as the student sees them, and whether the row was cut to ``max_length``.

    (prompt, response) is the tokenizer's text pair, a prompt-only row is tokenised alone; rows
    longer than ``max_length`` are truncated by the tokenizer's own rule (``longest_first``).
    """
    features, truncated = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        whole = tokenizer(
            prompt, response, verbose=False
        )  # no "longer than the maximum" warning: it is cut below
        cut = len(whole["input_ids"]) > max_length
        features.append(tokenizer(prompt, response, truncation=True, max_length=max_length) if cut else whole)
        truncated.append(cut)
    return features, truncated


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str | None],
    max_length: int,
    return_tensors: str = "pt",
) -> Any:
    """The student's input (:func:`tokenize_rows`) padded to the batch's longest row.

    Training (:class:`harmaug_pl.training.datamodule.PairCollator`) and serving
    (:class:`harmaug_pl.deploy.guard.Guard`) both tokenise through :func:`tokenize_rows`, so a served guard
    truncates exactly as its student was trained.
    """
    features, _ = tokenize_rows(tokenizer, prompts, responses, max_length)
    return tokenizer.pad(features, return_tensors=return_tensors)

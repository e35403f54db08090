"""The student's tokenisation of a (prompt, response) row, shared by training and serving.

A module of its own, importing nothing heavy, so a served guard (``harmaug serve``, the MLflow
model) loads without Lightning and the augmentation code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str | None],
    max_length: int,
    return_tensors: str = "pt",
) -> Any:
    """The student's input: (prompt, response) as a text pair, prompt-only rows alone, truncated to
    ``max_length`` and padded to the batch's longest row.

    Training (:class:`harmaug_pl.data.datamodule.PairCollator`) and serving
    (:class:`harmaug_pl.guard.Guard`) both call this, so a served guard truncates exactly as its
    student was trained.
    """
    features = [
        tokenizer(prompt, response, truncation=True, max_length=max_length)
        for prompt, response in zip(prompts, responses, strict=True)
    ]
    return tokenizer.pad(features, return_tensors=return_tensors)

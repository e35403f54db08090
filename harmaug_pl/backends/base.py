"""The small protocol every LLM backend implements (transformers now, vLLM later).

Two operations are all HarmAug needs from an LLM: *continue these chats* (generator and
responder, with a prefilled assistant turn) and *score the next token of these chats* (teacher).
Both take chats as lists of ``{"role", "content"}`` messages so the backend owns templating
(:mod:`harmaug_pl.backends.rendering`: one rule for every backend, over-long chats included).

A backend may also expose ``last_truncated: list[bool]``: per chat of its latest call, whether the
chat's contents were cut to fit its input budget. It is optional (not a protocol member); stages read
it through :func:`truncated_rows` and count the cut rows in the augmentation statistics.

A backend that draws tokens with its own code may name that code in a ``sampler: str`` attribute
(also optional): the chat stages put it in their cache keys, so rows drawn by another sampler are
drawn again, while the teacher's keys (which never sample) stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

Chat = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings shared by every backend (mirrors ``vllm.SamplingParams``)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)


@runtime_checkable
class ChatBackend(Protocol):
    """An LLM that can continue chats and score their next token."""

    @property
    def model_id(self) -> str:
        """Stable identity of the weights (goes into cache keys)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able identity (model, dtype, quantisation, templates) for cache keys and provenance.

        The cache must never mix rows from two different models or settings.
        """
        ...

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig, seed: int) -> list[str]:
        """Continue every chat and return only the new text, one string per chat.

        If a chat ends with an assistant message, that message is a *prefill*: the model continues
        it (``continue_final_message=True``) and the returned text excludes the prefill. Otherwise a
        generation prompt is added. ``seed`` makes the batch reproducible.
        """
        ...

    def next_token_logprobs(
        self,
        chats: Sequence[Chat],
        token_ids: Sequence[int],
        *,
        add_generation_prompt: bool,
        suffix: str = "",
    ) -> torch.Tensor:
        """Log-probabilities, normalised over the full vocabulary, of ``token_ids`` as the next token.

        The chat is rendered with the model's chat template (plus ``suffix``, e.g. ``"\\n\\n"`` for
        Llama Guard). Returns a float32 tensor of shape ``[len(chats), len(token_ids)]``.
        """
        ...

    def first_token_id(self, word: str) -> int:
        """Id of the first token of ``word`` as the model would write it at the start of its turn."""
        ...

    def close(self) -> None:
        """Free the model's memory (called before the student trains)."""
        ...


def truncated_rows(source: Any, count: int) -> list[bool]:
    """``source.last_truncated`` (a backend's or a teacher's) for the ``count`` rows of its latest call.

    A source that does not report it, or reports another number of rows, counts as having cut none.
    """
    flags = getattr(source, "last_truncated", None)
    if not isinstance(flags, list) or len(flags) != count:
        return [False] * count
    return [bool(flag) for flag in flags]

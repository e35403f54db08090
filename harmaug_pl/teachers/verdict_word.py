"""An LLM teacher whose next token is a verdict word (Llama-Guard, LLM judges)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from harmaug_pl.backends.base import Chat, ChatBackend, truncated_rows
from harmaug_pl.errors import ConfigError
from harmaug_pl.teachers.base import BatchedTeacher


class VerdictWordTeacher(BatchedTeacher):
    """An LLM whose next token is a verdict word: P(unsafe) = softmax over the two words' first tokens.

    Both log-probabilities are normalised over the full vocabulary first, so the result is
    exp(lu) / (exp(lu) + exp(ls)) whatever other tokens rank above them.
    """

    add_generation_prompt: bool
    suffix: str

    @property
    def cache_name(self) -> str:
        """The teacher's name in cache keys. Shipped teachers pin it as fixed text, so renaming or moving
        their class never relabels a cache (tests/test_cache_keys.py holds the keys of earlier commits)."""
        return type(self).__name__

    def __init__(self, backend: ChatBackend, unsafe_word: str, safe_word: str, batch_size: int) -> None:
        super().__init__(batch_size)
        self.backend = backend
        self.unsafe_word = unsafe_word
        self.safe_word = safe_word
        self._token_ids: list[int] | None = None

    @abstractmethod
    def _chats(self, prompts: list[str], responses: list[str | None]) -> list[Chat]:
        """The chat the model reads for each row."""

    def _verdict_ids(self) -> list[int]:
        if self._token_ids is None:
            unsafe, safe = (self.backend.first_token_id(w) for w in (self.unsafe_word, self.safe_word))
            if unsafe == safe:
                raise ConfigError(
                    f"{type(self).__name__}: unsafe_word {self.unsafe_word!r} and safe_word "
                    f"{self.safe_word!r} start with the same token (id {unsafe}) for model "
                    f"{self.backend.model_id!r}; "
                    "choose words whose first tokens differ"
                )
            self._token_ids = [unsafe, safe]
        return self._token_ids

    def _score_batch(self, prompts: list[str], responses: list[str | None]) -> list[float]:
        logprobs = self.backend.next_token_logprobs(
            self._chats(prompts, responses),
            self._verdict_ids(),
            add_generation_prompt=self.add_generation_prompt,
            suffix=self.suffix,
        )
        return torch.sigmoid(logprobs[:, 0] - logprobs[:, 1]).tolist()

    def _truncated(self, count: int) -> list[bool]:
        return truncated_rows(self.backend, count)

    def describe(self) -> dict[str, Any]:
        return {
            "teacher": self.cache_name,
            "backend": self.backend.describe(),
            "unsafe_word": self.unsafe_word,
            "safe_word": self.safe_word,
            "suffix": self.suffix,
        }

    def close(self) -> None:
        self.backend.close()

"""Llama-Guard-family guards as teachers: their own chat template, then the verdict word."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from harmaug_pl.backends.base import Chat, ChatBackend
from harmaug_pl.errors import ConfigError, DataError
from harmaug_pl.teachers.verdict_word import VerdictWordTeacher


class LlamaGuardTeacher(VerdictWordTeacher):
    """A Llama-Guard-style guard: its own chat template, then ``suffix``; it writes safe/unsafe next.

    The chat is ``[user: prompt]`` or ``[user: prompt, assistant: response]``, rendered without a
    generation prompt and followed by ``"\\n\\n"``: what the HarmAug code does for Llama-Guard-3.

    After ``unsafe`` it writes the violated codes on the next line (``"unsafe\\nS1,S10"``); Llama-3's
    tokenizer writes a code as ``code_prefix`` ("S") then the number, so :meth:`category_scores`
    reads the number token after ``suffix + unsafe_word + "\\n" + code_prefix``.
    """

    cache_name = "LlamaGuardTeacher"
    add_generation_prompt = False

    def __init__(
        self,
        backend: ChatBackend,
        unsafe_word: str = "unsafe",
        safe_word: str = "safe",
        suffix: str = "\n\n",
        batch_size: int = 8,
        code_prefix: str = "S",
    ) -> None:
        super().__init__(backend, unsafe_word, safe_word, batch_size)
        self.suffix = suffix
        self.code_prefix = code_prefix

    def category_read(self) -> dict[str, Any]:
        """What, beyond :meth:`describe`, determines :meth:`category_scores` (its cache key)."""
        return {"after": self.suffix + self.unsafe_word + "\n" + self.code_prefix}

    def _code_ids(self, codes: Sequence[str]) -> list[int]:
        """The number token of each code ("S10" -> the token of "10"), checked to be distinct."""
        ids: dict[int, str] = {}
        for code in codes:
            number = code[len(self.code_prefix) :]
            if not code.startswith(self.code_prefix) or not number.isdigit():
                raise ConfigError(
                    f"LlamaGuardTeacher: category code {code!r} is not {self.code_prefix!r} + a number"
                )
            token = self.backend.first_token_id(number)
            if token in ids:
                raise ConfigError(
                    f"LlamaGuardTeacher: codes {ids[token]!r} and {code!r} start with the same token (id "
                    f"{token}) for model {self.backend.model_id!r}: their numbers are not single tokens"
                )
            ids[token] = code
        return list(ids)

    def category_scores(
        self, prompts: Sequence[str], responses: Sequence[str | None], codes: Sequence[str]
    ) -> list[dict[str, float]]:
        """P(code | unsafe) per row: the guard's distribution over the first code it would write,
        renormalised over ``codes``' number tokens. The guard lists every violated code ("S1,S10");
        this reads the first, so a row of several categories puts its mass on the one written first."""
        if len(prompts) != len(responses):
            raise DataError(f"LlamaGuardTeacher got {len(prompts)} prompts but {len(responses)} responses")
        ids = self._code_ids(codes)
        after = self.category_read()["after"]
        result: list[dict[str, float]] = []
        for start in range(0, len(prompts), self.batch_size):
            chats = self._chats(
                list(prompts[start : start + self.batch_size]),
                list(responses[start : start + self.batch_size]),
            )
            logprobs = self.backend.next_token_logprobs(chats, ids, add_generation_prompt=False, suffix=after)
            probs = torch.softmax(logprobs.float(), dim=-1)
            result.extend(dict(zip(codes, row)) for row in probs.tolist())
        return result

    def _chats(self, prompts: list[str], responses: list[str | None]) -> list[Chat]:
        return [
            [{"role": "user", "content": prompt}]
            + ([] if response is None else [{"role": "assistant", "content": response}])
            for prompt, response in zip(prompts, responses)
        ]

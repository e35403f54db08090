"""Llama-Guard-family guards as teachers: their own chat template, then the verdict word."""

from __future__ import annotations

from harmaug_pl.backends.base import Chat, ChatBackend
from harmaug_pl.teachers.verdict_word import VerdictWordTeacher


class LlamaGuardTeacher(VerdictWordTeacher):
    """A Llama-Guard-style guard: its own chat template, then ``suffix``; it writes safe/unsafe next.

    The chat is ``[user: prompt]`` or ``[user: prompt, assistant: response]``, rendered without a
    generation prompt and followed by ``"\\n\\n"``: what the HarmAug code does for Llama-Guard-3.
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
    ) -> None:
        super().__init__(backend, unsafe_word, safe_word, batch_size)
        self.suffix = suffix

    def _chats(self, prompts: list[str], responses: list[str | None]) -> list[Chat]:
        return [
            [{"role": "user", "content": prompt}]
            + ([] if response is None else [{"role": "assistant", "content": response}])
            for prompt, response in zip(prompts, responses)
        ]

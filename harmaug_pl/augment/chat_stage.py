"""What the generator and the responder share: chats in, sampled text out, through the cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from harmaug_pl.augment.cache import StageResult, content_key, no_op, run_stage
from harmaug_pl.backends.base import Chat, ChatBackend, SamplingConfig, truncated_rows
from harmaug_pl.errors import ConfigError, HarmAugError


@dataclass(frozen=True)
class ChatRequest:
    """One chat to continue; ``key`` addresses its result in the cache, ``meta`` says where it came from."""

    key: str
    chat: Chat
    meta: dict[str, Any] = field(default_factory=dict)


def is_sample(value: dict[str, Any]) -> bool:
    """A cached sample is its text and the seed it was sampled with."""
    return isinstance(value.get("text"), str) and isinstance(value.get("seed"), int)


class ChatStage:
    """A cached, sharded ``backend.generate`` over chat requests; subclasses build the chats."""

    stage: ClassVar[str]

    def __init__(self, backend: ChatBackend, sampling: SamplingConfig, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"{type(self).__name__}.batch_size must be >= 1, got {batch_size}")
        if sampling.max_new_tokens < 1:
            raise ConfigError(
                f"{type(self).__name__}.sampling.max_new_tokens must be >= 1, got {sampling.max_new_tokens}"
            )
        self.backend = backend
        self.sampling = sampling
        self.batch_size = batch_size
        self.seed = seed
        self._identity: dict[str, Any] | None = None

    @property
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = dict(self.backend.describe())
        return self._identity

    def request(self, chat: Chat, meta: dict[str, Any], **key_parts: Any) -> ChatRequest:
        """A request keyed by everything that determines its output: model, exact chat, sampling, seed.

        ``key_parts`` tell apart requests whose chats are equal on purpose (e.g. the attempt number);
        ``meta`` (positions, indices) stays out of the key so reordering inputs never invalidates rows.
        """
        key = content_key(
            stage=self.stage,
            model=self.identity,
            chat=chat,
            sampling=self.sampling,
            seed=self.seed,
            **key_parts,
        )
        return ChatRequest(key=key, chat=chat, meta=meta)

    def compute(self, requests: list[ChatRequest], seed: int) -> list[dict[str, Any]]:
        texts = self.backend.generate([r.chat for r in requests], self.sampling, seed)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise HarmAugError(f"{self.stage}: the backend returned {bad[0]} instead of str")
        cut = truncated_rows(self.backend, len(texts))  # counted per stage in the statistics
        return [
            {"text": text, "seed": seed, **({"truncated": True} if c else {})} for text, c in zip(texts, cut)
        ]

    def run(
        self,
        requests: Sequence[ChatRequest],
        cache_dir: str | Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = no_op,
    ) -> StageResult:
        return run_stage(
            cache_dir,
            self.stage,
            requests,
            [r.key for r in requests],
            self.compute,
            batch_size=self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            barrier=barrier,
            desc=self.stage,
            valid=is_sample,
        )

    def close(self) -> None:
        self.backend.close()

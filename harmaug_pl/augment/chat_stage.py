"""What the generator and the responder share: chats in, sampled text out, through the cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
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


def chat_length(chat: Chat) -> int:
    """Characters in a chat's messages: the length batches are sorted by when the backend cannot count
    its tokens (``prompt_lengths``)."""
    return sum(len(message["content"]) for message in chat)


def prompt_lengths(backend: ChatBackend, chats: Sequence[Chat]) -> list[int]:
    """The backend's prompt token counts when it has ``prompt_lengths``, else :func:`chat_length`."""
    counter = getattr(backend, "prompt_lengths", None)
    return list(counter(chats)) if counter is not None else [chat_length(chat) for chat in chats]


def length_order(lengths: Sequence[int], window: int) -> list[int]:
    """Indices sorted by length (ties: by index) within consecutive windows of ``window`` items."""
    return [
        index
        for start in range(0, len(lengths), window)
        for index in sorted(range(start, min(start + window, len(lengths))), key=lambda i: (lengths[i], i))
    ]


def is_sample(value: dict[str, Any]) -> bool:
    """A cached sample is its text and the seed it was sampled with."""
    return isinstance(value.get("text"), str) and isinstance(value.get("seed"), int)


class ChatStage:
    """A cached, sharded ``backend.generate`` over chat requests; subclasses build the chats.

    ``sort_window``: requests are taken ``sort_window`` batches at a time and sorted by length
    before being cut into batches (1: batches in request order), see :meth:`run`.
    """

    stage: ClassVar[str]

    def __init__(
        self, backend: ChatBackend, sampling: SamplingConfig, batch_size: int, seed: int, sort_window: int = 8
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"{type(self).__name__}.batch_size must be >= 1, got {batch_size}")
        if sort_window < 1:
            raise ConfigError(f"{type(self).__name__}.sort_window must be >= 1, got {sort_window}")
        if sampling.max_new_tokens < 1:
            raise ConfigError(
                f"{type(self).__name__}.sampling.max_new_tokens must be >= 1, got {sampling.max_new_tokens}"
            )
        self.backend = backend
        self.sampling = sampling
        self.batch_size = batch_size
        self.seed = seed
        self.sort_window = sort_window
        self._identity: dict[str, Any] | None = None

    @property
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            identity = dict(self.backend.describe())
            sampler = getattr(self.backend, "sampler", None)  # optional: see harmaug_pl.backends.base
            if sampler:
                identity["sampler"] = sampler
            self._identity = identity
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
        """Every request's sample, in the order of ``requests``; batches are cut in length order.

        A batch is padded to its longest chat, and on CPU the prompt's forward pass is most of the
        cost: chats of similar length batched together waste little of it. Requests are sorted by
        length within windows of ``sort_window`` batches, so the order is a function of the requests
        alone (every rank and every resumed run cuts the same batches), and asking for more requests
        later leaves the batches of every full window as they were (their cached rows are not redone).
        """
        order = list(range(len(requests)))
        if self.sort_window > 1:
            lengths = prompt_lengths(self.backend, [r.chat for r in requests])
            order = length_order(lengths, self.sort_window * self.batch_size)
        ordered = [requests[i] for i in order]
        result = run_stage(
            cache_dir,
            self.stage,
            ordered,
            [r.key for r in ordered],
            self.compute,
            batch_size=self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            barrier=barrier,
            desc=self.stage,
            valid=is_sample,
        )
        values: list[dict[str, Any]] = [{}] * len(requests)
        for position, index in enumerate(order):
            values[index] = result.values[position]
        return replace(result, values=values)

    def close(self) -> None:
        self.backend.close()

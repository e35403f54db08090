"""Barriers that carry each rank's health, so one failing rank stops every rank at once.

A plain barrier leaves the healthy ranks waiting for a rank that raised until the process group
times out (30 minutes by default), and the error that matters is then buried in another process's
log. Here every barrier is an all-gather of a status: ``None`` for "fine", or the failing rank's
message. A rank that raises announces its error at the next exchange the others reach, and all ranks
raise together, the healthy ones with the failing rank's message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from harmaug_pl.errors import ConfigError, HarmAugError

Gather = Callable[[str | None], list[str | None]]
T = TypeVar("T")


class PeerRankFailed(HarmAugError):
    """Another rank failed; its message is in this one."""


def _torch_gather(world_size: int) -> Gather:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"world_size is {world_size} but torch.distributed is not initialised, so the ranks cannot "
            "share the work; start the run through the Trainer (fit/augment) or torchrun"
        )

    return all_gather_objects


def all_gather_objects(value: T) -> list[T]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list[T] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, value)
    return gathered


class RankSync:
    """``barrier()`` for the stages, ``guard()`` around a whole sharded job.

    Every rank must run the same sequence of barriers; ``guard`` keeps that true when one raises: the
    failing rank sends its error in place of the barrier the others are waiting in, and a job that
    succeeds ends with one more barrier, which catches a failure after the last stage barrier.
    """

    def __init__(self, rank: int, world_size: int, gather: Gather | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self._gather = gather if gather is not None or world_size == 1 else _torch_gather(world_size)

    def _exchange(self, status: str | None) -> None:
        if self._gather is None:
            return
        failed = [(rank, message) for rank, message in enumerate(self._gather(status)) if message is not None]
        if failed and status is None:
            raise PeerRankFailed("; ".join(f"rank {rank} failed: {message}" for rank, message in failed))

    def barrier(self) -> None:
        """Wait for every rank; raise :class:`PeerRankFailed` if any of them failed instead."""
        self._exchange(None)

    @contextmanager
    def guard(self) -> Iterator[None]:
        try:
            yield
        except PeerRankFailed:
            raise  # every rank learnt it at the same exchange: nothing left to announce
        except Exception as err:
            self._exchange(f"{type(err).__name__}: {err}")
            raise
        self.barrier()

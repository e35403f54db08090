"""Append-only, content-addressed JSONL store per stage, and the sharded stage runner on top of it.

Generating and labelling ~300k rows takes hours, so every finished batch is made durable at once
(flush + fsync) and a re-run after a crash, a kill or a pre-emption computes only what is missing.
Layout: ``<cache_dir>/<stage>/rank<r>.jsonl``, one ``{"key": <sha256 hex>, "value": {...}}`` object
per line. Each rank appends to its own file under an exclusive file lock (two runs pointed at the
same directory stay safe); readers merge every file of the stage and the first record of a key wins,
so a key written twice by racing runs is harmless. JSON only: nothing in the cache is ever executed
or unpickled, and keys are hex digests, so no record can name a path outside the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock

from harmaug_pl.errors import ConfigError, HarmAugError
from harmaug_pl.progress_lines import stage_progress

log = logging.getLogger(__name__)

T = TypeVar("T")
Compute = Callable[[list[T], int], list[dict[str, Any]]]
Check = Callable[[dict[str, Any]], bool]

_STAGE_RE = re.compile(r"[a-z0-9_]+")
_KEY_RE = re.compile(r"[0-9a-f]{64}")


class IncompleteStageError(HarmAugError):
    """Rows of a stage are still missing after every rank finished (a rank died or was killed)."""


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    raise TypeError(f"cannot put {type(obj).__name__} into a cache key")


def content_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (stage, model identity, template, sampling, seed, input).

    Any change to what determines a row's value changes its key, so stale rows are never reused.
    """
    canonical = json.dumps(
        parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_jsonable
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def derive_seed(base_seed: int, stage: str, keys: Sequence[str]) -> int:
    """A batch's sampling seed, from what the batch contains rather than from when it ran.

    A re-run after a kill therefore samples every batch exactly as an uninterrupted run would have.
    """
    digest = hashlib.sha256(json.dumps([base_seed, stage, list(keys)]).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def validate_stage(stage: str) -> str:
    if not _STAGE_RE.fullmatch(stage):
        raise ConfigError(f"invalid cache stage name {stage!r}: use lowercase letters, digits and '_'")
    return stage


class StageStore:
    """The records of one stage: reads every writer's file, appends to this rank's own file.

    ``valid`` checks a record's value (the stage's schema): a record that is valid JSON but fails it
    (hand-edited, written by another version, bit rot) counts as a corrupt line and gets recomputed.
    """

    def __init__(self, cache_dir: str | Path, stage: str, rank: int = 0, valid: Check | None = None) -> None:
        if rank < 0:
            raise ConfigError(f"rank must be >= 0, got {rank}")
        self.stage = validate_stage(stage)
        self.dir = Path(cache_dir) / stage
        self.path = self.dir / f"rank{rank}.jsonl"
        self._values: dict[str, dict[str, Any]] = {}
        self._offsets: dict[Path, int] = {}
        self._reported_tails: set[tuple[Path, int]] = set()
        self.skipped_lines = 0
        self._valid = valid

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._values.get(key)

    def refresh(self) -> None:
        """Read what every writer appended since the last refresh (complete lines only).

        A complete line that is not a valid record is skipped, counted and warned about; its row is
        simply missing, so it gets recomputed. An unterminated last line is a write in flight or cut
        by a kill: it is left unread here and truncated by the next append to that file.
        """
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.jsonl")):
            self._read_new(path)

    def _read_new(self, path: Path) -> None:
        start = self._offsets.get(path, 0)
        with path.open("rb") as handle:
            handle.seek(start)
            data = handle.read()
        complete = data.rfind(b"\n") + 1
        bad_lines: list[int] = []
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            record = _parse(line)
            if record is None or (self._valid is not None and not self._valid(record[1])):
                bad_lines.append(number)
            else:
                self._values.setdefault(record[0], record[1])
        self._offsets[path] = start + complete
        if bad_lines:
            self.skipped_lines += len(bad_lines)
            log.warning(
                "cache %s: skipped %d corrupt line(s) (line %s of the newly read part, from byte %d); "
                "their rows will be recomputed",
                path,
                len(bad_lines),
                ", ".join(map(str, bad_lines[:5])),
                start,
            )
        tail = (path, start + complete)
        if complete < len(data) and tail not in self._reported_tails:
            self._reported_tails.add(tail)
            self.skipped_lines += 1
            log.warning(
                "cache %s ends with an unterminated line (%d bytes, a killed or running writer); "
                "ignored, its row will be recomputed if it is missing",
                path,
                len(data) - complete,
            )

    def append(self, records: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Durably append ``(key, value)`` records: one write, flush and fsync under this file's lock."""
        if not records:
            return
        for key, value in records:
            if not _KEY_RE.fullmatch(key) or not isinstance(value, dict):
                raise HarmAugError(f"cache {self.path}: refusing to write a malformed record for key {key!r}")
        payload = "".join(
            json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n" for key, value in records
        ).encode("utf-8")
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{self.path}.lock"):
            _truncate_partial_tail(self.path)
            with self.path.open("ab") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())


def _parse(line: bytes) -> tuple[str, dict[str, Any]] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    key, value = record.get("key"), record.get("value")
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or not isinstance(value, dict):
        return None
    return key, value


def _truncate_partial_tail(path: Path) -> None:
    """Cut an unterminated last line (a writer killed mid-line) so the next record starts on its own line.

    Called under the file's lock, so the partial line cannot belong to a live writer.
    """
    if not path.exists():
        return
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        block = 65536
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            chunk = handle.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            log.warning("cache %s: truncating a %d-byte unterminated last line", path, size - keep)
            handle.truncate(keep)


@dataclass
class StageResult:
    """Every item's value plus what this rank did (for throughput statistics)."""

    values: list[dict[str, Any]]
    computed: int
    cached: int
    seconds: float
    skipped_lines: int

    def stats(self, stage: str) -> dict[str, float | int]:
        return {
            f"computed_{stage}": self.computed,
            f"cached_{stage}": self.cached,
            f"seconds_{stage}": round(self.seconds, 3),
            f"rows_per_s_{stage}": round(self.computed / self.seconds, 3) if self.seconds > 0 else 0.0,
            f"cache_skipped_lines_{stage}": self.skipped_lines,
            # every row of the stage, cached or not: inputs whose contents were cut to fit the model
            f"truncated_{stage}": sum(1 for value in self.values if value.get("truncated")),
        }


def no_op() -> None:
    """The barrier of a single process."""


def run_stage(
    cache_dir: str | Path,
    stage: str,
    items: Sequence[T],
    keys: Sequence[str],
    compute: Compute[T],
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = no_op,
    desc: str | None = None,
    valid: Check | None = None,
) -> StageResult:
    """Compute the values of ``items`` through the cache, sharded across ranks, and return all of them.

    Items are cut into fixed chunks by position (chunk ``j`` = ``items[j*B:(j+1)*B]``); rank ``r`` owns
    chunks with ``j % world_size == r``. A fully cached chunk is skipped; otherwise the whole chunk is
    recomputed with a seed derived from its keys (so batch composition and sampling match an
    uninterrupted run) and only its missing rows are appended. After ``barrier()`` every rank reads
    the merged store and gets the values of all items. ``valid``: see :class:`StageStore`.
    """
    if len(items) != len(keys):
        raise ValueError(f"stage {stage}: {len(items)} items but {len(keys)} keys")
    if batch_size < 1:
        raise ConfigError(f"stage {stage}: batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"stage {stage}: rank {rank} is outside world_size {world_size}")
    store = StageStore(cache_dir, stage, rank, valid)
    store.refresh()
    chunks = [range(j, min(j + batch_size, len(items))) for j in range(0, len(items), batch_size)]
    mine = chunks[rank::world_size]
    computed = cached = 0
    seconds = 0.0
    label = (desc or stage) + (f" (rank 0's share of {world_size} ranks)" if world_size > 1 else "")
    with stage_progress(sum(len(c) for c in mine), label, enabled=rank == 0) as bar:
        for chunk in mine:
            chunk_keys = [keys[i] for i in chunk]
            missing = [n for n, key in enumerate(chunk_keys) if key not in store]
            cached += len(chunk) - len(missing)
            if not missing:
                bar.update(len(chunk), cached=True)
            else:
                started = time.perf_counter()
                values = compute([items[i] for i in chunk], derive_seed(seed, stage, chunk_keys))
                seconds += time.perf_counter() - started
                if len(values) != len(chunk):
                    raise HarmAugError(
                        f"stage {stage}: the model returned {len(values)} results for a batch of {len(chunk)}"
                    )
                new: dict[str, dict[str, Any]] = {}
                for n in missing:
                    new.setdefault(chunk_keys[n], values[n])
                store.append(list(new.items()))
                computed += len(missing)
                bar.update(len(chunk))
    barrier()
    store.refresh()
    absent = sorted({i for i, key in enumerate(keys) if key not in store})
    if absent:
        raise IncompleteStageError(
            f"stage {stage}: {len(absent)} of {len(items)} rows are missing from the cache {store.dir} after "
            f"all ranks finished (first missing item index: {absent[0]}); a rank probably died. Re-running "
            "computes only the missing rows."
        )
    return StageResult(
        values=[store.get(key) for key in keys],  # type: ignore[misc]
        computed=computed,
        cached=cached,
        seconds=seconds,
        skipped_lines=store.skipped_lines,
    )

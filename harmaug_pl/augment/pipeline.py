"""generate -> respond -> label, sharded across ranks and resumable through the on-disk cache.

Every stage writes raw results to ``<cache_dir>/<stage>/``; everything derived from them (cleaning,
de-duplication, assembly) is recomputed deterministically on every rank, so all ranks end with
the same rows and a re-run after a kill reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harmaug_pl.augment.cache import StageResult, content_key, no_op, run_stage
from harmaug_pl.augment.generator import InstructionGenerator
from harmaug_pl.augment.responder import Responder, Response
from harmaug_pl.backends.base import truncated_rows
from harmaug_pl.data.schema import GuardExample
from harmaug_pl.errors import ConfigError, HarmAugError, first_line

if TYPE_CHECKING:  # the pipeline only calls the protocol; importing it would load the teacher's backends
    from harmaug_pl.teachers.base import Teacher

log = logging.getLogger(__name__)

Barrier = Callable[[], None]


def is_probability(score: Any) -> bool:
    """What a teacher must return, and what a cached label record must hold, for a row's P(unsafe)."""
    return isinstance(score, (int, float)) and math.isfinite(score) and 0.0 <= score <= 1.0


@dataclass
class AugmentationResult:
    """Seed rows then synthetic rows (instruction, + each response kind), all teacher-scored."""

    rows: list[GuardExample]
    stats: dict[str, float | int] = field(default_factory=dict)


@contextmanager
def _memory_hint(stage: str, batch_size: int) -> Iterator[None]:
    """Turn a CUDA out-of-memory error into the pack setting to lower."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        raise ConfigError(
            f"out of GPU memory in the {stage} stage ({first_line(err)}): lower "
            f"data.init_args.{stage}.init_args.batch_size (now {batch_size}), or the backend's "
            "max_input_tokens / the stage's sampling.max_new_tokens; finished batches are cached, so "
            "re-running resumes"
        ) from err


class AugmentationPipeline:
    """HarmAug's data pipeline; ``generator=None`` (or ``augment=False``) gives the KD-only baseline.

    ``responder=None`` keeps the synthetic instructions as prompt-only rows. The student learns the
    teacher, as in the paper: every row, seed rows included, gets the teacher's P(unsafe); seed rows
    keep their human label too.

    ``category_codes``: with a teacher that reads categories (``category_scores``, Llama-Guard),
    every labelled row also gets the teacher's P(code | unsafe) over these codes: one more read per
    row, cached in its own stage under its own keys, so the P(unsafe) records and keys stay as they are.
    """

    def __init__(
        self,
        generator: InstructionGenerator | None,
        responder: Responder | None,
        teacher: Teacher,
        threshold: float = 0.5,
        category_codes: Sequence[str] = (),
    ) -> None:
        self.generator = generator
        self.responder = responder
        self.teacher = teacher
        self.threshold = threshold
        self.category_codes = list(category_codes)

    @property
    def reads_categories(self) -> bool:
        return bool(self.category_codes) and hasattr(self.teacher, "category_scores")

    def run(
        self,
        seed_rows: Sequence[GuardExample],
        cache_dir: str | Path,
        *,
        augment: bool = True,
        num_instructions: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        barrier: Barrier = no_op,
    ) -> AugmentationResult:
        """Build the teacher-labelled training rows; every rank returns all of them.

        ``num_instructions`` overrides the generator's (raising it later reuses every cached row).
        """
        stats: dict[str, float | int] = {}
        synthetic: list[GuardExample] = []
        groups: list[str] = []
        if augment:
            if self.generator is None:
                raise ConfigError("augment=True needs a generator")
            synthetic, groups = self._augment(
                self.generator, seed_rows, Path(cache_dir), num_instructions, rank, world_size, barrier, stats
            )
            self._release_chat_stages()
        seed_groups = ["seed_response" if row.response is not None else "seed_prompt" for row in seed_rows]
        rows, labelled = self._label(
            [*seed_rows, *synthetic], Path(cache_dir), "label", rank, world_size, barrier
        )
        stats.update(labelled.stats("label"))
        stats.update(self._label_stats(rows, [*seed_groups, *groups]))
        stats["rows_seed"] = len(seed_rows)
        stats["rows_synthetic"] = len(synthetic)
        stats["rows_total"] = len(rows)
        if rank == 0:
            summary = "\n".join(f"  {name}: {value}" for name, value in sorted(stats.items()))
            log.info("HarmAug augmentation summary (rank 0's share of the work):\n%s", summary)
        return AugmentationResult(rows=rows, stats=stats)

    def _augment(
        self,
        generator: InstructionGenerator,
        seed_rows: Sequence[GuardExample],
        cache_dir: Path,
        num_instructions: int | None,
        rank: int,
        world_size: int,
        barrier: Barrier,
        stats: dict[str, float | int],
    ) -> tuple[list[GuardExample], list[str]]:
        """Synthetic rows (unlabelled) and, parallel to them, their statistics group names."""
        requests = generator.requests(seed_rows, num_instructions)
        with _memory_hint("generator", generator.batch_size):
            generated = generator.run(requests, cache_dir, rank=rank, world_size=world_size, barrier=barrier)
        instructions, dropped = generator.clean(seed_rows, requests, generated.values)
        stats.update(generated.stats("generate"))
        stats["instructions_asked"] = len(requests)
        stats["instructions_kept"] = len(instructions)
        stats.update({f"dropped_{reason}": n for reason, n in dropped.items()})

        answers: dict[int, list[Response]] = defaultdict(list)
        if self.responder is not None:
            response_requests = self.responder.requests(instructions)
            with _memory_hint("responder", self.responder.batch_size):
                answered = self.responder.run(
                    response_requests, cache_dir, rank=rank, world_size=world_size, barrier=barrier
                )
            responses, counts = self.responder.collect(response_requests, answered.values)
            stats.update(answered.stats("respond"))
            stats.update(counts)
            for response in responses:
                answers[response.instruction].append(response)

        rows: list[GuardExample] = []
        groups: list[str] = []
        for index, instruction in enumerate(instructions):
            origin = {"instruction": instruction.provenance}
            rows.append(GuardExample(prompt=instruction.text, source="synthetic", provenance=origin))
            groups.append("synthetic_prompt")
            for response in answers[index]:
                rows.append(
                    GuardExample(
                        prompt=instruction.text,
                        response=response.text,
                        source="synthetic",
                        provenance={**origin, "response": response.provenance},
                    )
                )
                groups.append(f"synthetic_{response.kind}")
        return rows, groups

    def label(
        self,
        rows: Sequence[GuardExample],
        cache_dir: str | Path,
        *,
        stage: str = "label",
        rank: int = 0,
        world_size: int = 1,
        barrier: Barrier = no_op,
    ) -> list[GuardExample]:
        """``rows`` with the teacher's P(unsafe) as ``teacher_score``, through the cache (e.g. eval sets)."""
        return self._label(rows, Path(cache_dir), stage, rank, world_size, barrier)[0]

    def _label(
        self,
        rows: Sequence[GuardExample],
        cache_dir: Path,
        stage: str,
        rank: int,
        world_size: int,
        barrier: Barrier,
    ) -> tuple[list[GuardExample], StageResult]:
        teacher_id = dict(self.teacher.describe())
        # The key names the task, not the stage directory: a row scored for one set is the same row
        # in another, whatever directory its record lives in.
        keys = [
            content_key(stage="label", model=teacher_id, prompt=row.prompt, response=row.response)
            for row in rows
        ]
        result = self._teacher_stage(
            cache_dir, stage, rows, keys, self._score, f"{stage} (teacher)",
            lambda value: is_probability(value.get("score")), rank, world_size, barrier,
        )  # fmt: skip
        scored = [replace(row, teacher_score=value["score"]) for row, value in zip(rows, result.values)]
        if self.reads_categories:
            scored = self._label_categories(scored, cache_dir, stage, teacher_id, rank, world_size, barrier)
        return scored, result

    def _label_categories(
        self,
        rows: list[GuardExample],
        cache_dir: Path,
        stage: str,
        teacher_id: dict[str, Any],
        rank: int,
        world_size: int,
        barrier: Barrier,
    ) -> list[GuardExample]:
        """``rows`` with the teacher's P(code | unsafe) as ``teacher_categories``, through the cache."""
        read = {**teacher_id, **self.teacher.category_read()}  # type: ignore[attr-defined]
        codes = self.category_codes
        keys = [
            content_key(
                stage="label_categories", model=read, codes=codes, prompt=row.prompt, response=row.response
            )
            for row in rows
        ]

        def valid(value: dict[str, Any]) -> bool:
            p = value.get("p")
            return isinstance(p, dict) and set(p) == set(codes) and all(is_probability(v) for v in p.values())

        result = self._teacher_stage(
            cache_dir, f"{stage}_categories", rows, keys, self._score_categories,
            f"{stage} categories (teacher)", valid, rank, world_size, barrier,
        )  # fmt: skip
        return [replace(row, teacher_categories=value["p"]) for row, value in zip(rows, result.values)]

    def _teacher_stage(
        self,
        cache_dir: Path,
        stage: str,
        rows: list[GuardExample],
        keys: list[str],
        compute: Callable[[list[GuardExample], int], list[dict[str, Any]]],
        desc: str,
        valid: Callable[[dict[str, Any]], bool],
        rank: int,
        world_size: int,
        barrier: Barrier,
    ) -> StageResult:
        """One cached teacher stage: the teacher's batch size, seed 0 (it is deterministic)."""
        with _memory_hint("teacher", self.teacher.batch_size):
            return run_stage(
                cache_dir, stage, rows, keys, compute, batch_size=self.teacher.batch_size, seed=0,
                rank=rank, world_size=world_size, barrier=barrier, desc=desc, valid=valid,
            )  # fmt: skip

    def _score_categories(self, rows: list[GuardExample], seed: int) -> list[dict[str, Any]]:
        """The teacher's P(code | unsafe) per row (deterministic: ``seed`` unused)."""
        read = self.teacher.category_scores(  # type: ignore[attr-defined]
            [row.prompt for row in rows], [row.response for row in rows], self.category_codes
        )
        return [{"p": {code: float(p) for code, p in values.items()}} for values in read]

    def _score(self, rows: list[GuardExample], seed: int) -> list[dict[str, Any]]:
        """The teacher is deterministic, so ``seed`` is unused; the score must be a probability."""
        scores = self.teacher.score([row.prompt for row in rows], [row.response for row in rows])
        values = []
        for row, score, cut in zip(rows, scores, truncated_rows(self.teacher, len(rows))):
            if not is_probability(score):
                raise HarmAugError(
                    f"the teacher returned P(unsafe)={score!r} for the prompt {row.prompt[:80]!r}"
                )
            values.append({"score": float(score), **({"truncated": True} if cut else {})})
        return values

    def _label_stats(self, rows: Sequence[GuardExample], groups: Sequence[str]) -> dict[str, float | int]:
        """Teacher-unsafe rate per row group, and teacher/human agreement on labelled seed rows."""
        unsafe: dict[str, list[bool]] = defaultdict(list)
        agree: list[bool] = []
        for row, group in zip(rows, groups):
            hard = (row.teacher_score or 0.0) > self.threshold
            unsafe[group].append(hard)
            if row.source == "seed" and row.label is not None:
                agree.append(hard == bool(row.label))
        stats: dict[str, float | int] = {
            f"teacher_unsafe_rate_{group}": round(sum(flags) / len(flags), 4)
            for group, flags in unsafe.items()
        }
        if agree:
            stats["teacher_human_agreement_seed"] = round(sum(agree) / len(agree), 4)
        return stats

    def _release_chat_stages(self) -> None:
        """Free the generator and responder before the teacher loads.

        On one GPU they would otherwise keep memory the teacher needs (a vLLM engine holds most of
        the GPU). A model the teacher shares stays loaded: the teacher takes its reference first.
        """
        self.teacher.describe()
        teacher_backend = getattr(self.teacher, "backend", None)
        backends = {id(s.backend): s.backend for s in (self.generator, self.responder) if s is not None}
        for backend in backends.values():
            if backend is not teacher_backend:
                backend.close()

    def close(self) -> None:
        """Free the generator, responder and teacher models (once each, even when shared)."""
        models: dict[int, Any] = {}
        for stage in (self.generator, self.responder):
            if stage is not None:
                models.setdefault(id(stage.backend), stage.backend)
        models.setdefault(id(self.teacher), self.teacher)
        for model in models.values():
            model.close()

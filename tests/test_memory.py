"""Memory safety: LLM stages are freed before the teacher and the student; OOM names the setting to lower."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from harmaug_pl.augment.generator import InstructionGenerator
from harmaug_pl.augment.pipeline import AugmentationPipeline
from harmaug_pl.augment.responder import Responder
from harmaug_pl.errors import ConfigError
from tests.test_augment import SEED, FakeBackend, FakeTeacher, make_pipeline
from tests.test_datamodule import tiny_datamodule


class WatchingTeacher(FakeTeacher):
    """Records, at its first score, whether the generator's and responder's models were already freed."""

    def __init__(self, watched: list[FakeBackend], backend: FakeBackend | None = None) -> None:
        super().__init__()
        self.watched = watched
        self.backend = backend
        self.closed_when_scoring: list[int] | None = None

    def score(self, prompts: Sequence[str], responses: Sequence[str | None]) -> list[float]:
        if self.closed_when_scoring is None:
            self.closed_when_scoring = [backend.closed for backend in self.watched]
        return super().score(prompts, responses)


def test_generator_and_responder_are_freed_before_the_teacher_scores(tmp_path: Path) -> None:
    generator, responder = FakeBackend(), FakeBackend("fake-responder")
    teacher = WatchingTeacher([generator, responder])
    make_pipeline(generator, responder, teacher).run(SEED, tmp_path)
    assert teacher.closed_when_scoring == [1, 1]


def test_a_backend_the_teacher_uses_stays_loaded(tmp_path: Path) -> None:
    shared, responder = FakeBackend(), FakeBackend("fake-responder")
    teacher = WatchingTeacher([shared, responder], backend=shared)
    make_pipeline(shared, responder, teacher).run(SEED, tmp_path)
    assert teacher.closed_when_scoring == [0, 1]


class OutOfMemoryBackend(FakeBackend):
    def generate(self, chats, sampling, seed):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class OutOfMemoryTeacher(FakeTeacher):
    def score(self, prompts, responses):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")


def test_out_of_memory_names_the_pack_setting_to_lower(tmp_path: Path) -> None:
    pipeline = AugmentationPipeline(
        InstructionGenerator(OutOfMemoryBackend(), num_instructions=8, batch_size=4), None, FakeTeacher()
    )
    with pytest.raises(
        ConfigError, match=r"generator stage .*data\.init_args\.generator\.init_args\.batch_size \(now 4\)"
    ):
        pipeline.run(SEED, tmp_path / "a")
    pipeline = AugmentationPipeline(
        InstructionGenerator(FakeBackend(), num_instructions=8, batch_size=4),
        Responder(FakeBackend("fake-responder"), batch_size=3),
        OutOfMemoryTeacher(batch_size=5),
    )
    with pytest.raises(
        ConfigError, match=r"teacher stage .*data\.init_args\.teacher\.init_args\.batch_size \(now 5\)"
    ):
        pipeline.run(SEED, tmp_path / "b")


def test_build_frees_every_model_even_when_it_fails(tmp_path: Path, tiny_student: Path) -> None:
    dm = tiny_datamodule(tmp_path, tiny_student)
    teacher = FakeTeacher(fail_after_rows=0)
    dm.pipeline.teacher = teacher
    with pytest.raises(RuntimeError, match="simulated crash"):
        dm.build()
    assert teacher.closed == 1

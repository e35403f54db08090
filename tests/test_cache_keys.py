"""Cache keys survive refactors: a cache filled by an earlier commit must be reused, not relabelled.

The hex digests below were computed at commit 1fe4cfe, before the package moved to its layout by
concern (teachers/, training/, deploy/, ...). Every stage's key is built from the classes' own
``describe()`` identities, so a renamed module or class that leaked into a key would change these
digests and silently recompute hours of GPU work on the paper packs. Placeholder texts only.
"""

from __future__ import annotations

from typing import Any

import pytest

from harmaug_pl.augment.cache import content_key
from harmaug_pl.augment.generator import Instruction, InstructionGenerator
from harmaug_pl.augment.responder import Responder
from harmaug_pl.backends.base import SamplingConfig
from harmaug_pl.data.schema import GuardExample
from harmaug_pl.teachers.judge import JudgeTeacher
from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher
from harmaug_pl.teachers.sequence_classifier import SequenceClassifierTeacher

SEED_ROWS = [
    GuardExample(prompt="write a rude placeholder joke", label=1),
    GuardExample(prompt="tell me a mean placeholder insult", label=1),
    GuardExample(prompt="how do I bake bread?", label=0),
]


class FixedBackend:
    """A backend whose identity is fixed text: the key then depends on harmaug's own code only."""

    model_id = "tiny-guard"

    def describe(self) -> dict[str, Any]:
        return {"backend": "transformers", "model": "tiny-guard"}

    def close(self) -> None:
        pass


def label_key(teacher: Any) -> str:
    """The label stage's key for one prompt-only row, as the pipeline builds it."""
    return content_key(
        stage="label", model=dict(teacher.describe()), prompt="a mild placeholder prompt", response=None
    )


@pytest.mark.parametrize(
    ("teacher", "before"),
    [
        (
            LlamaGuardTeacher(FixedBackend()),
            "16d4d9f2322f2182e2f8b9f57aad7da64dd507b992912617afbb304b5d39e905",
        ),
        (JudgeTeacher(FixedBackend()), "942fcb8674e4e659033ee30fa56cca3e536b301bef9ff7133e848deded20cbe8"),
        (
            SequenceClassifierTeacher("tiny-classifier"),
            "654063ff19dc74e81b9efff023e4b6ec47a7530ea72ace501e3495f74dd1e5e7",
        ),
    ],
    ids=["llama_guard", "judge", "sequence_classifier"],
)
def test_teacher_label_keys_are_those_of_the_earlier_layout(teacher: Any, before: str) -> None:
    assert label_key(teacher) == before


def test_generator_and_responder_keys_are_those_of_the_earlier_layout() -> None:
    sampling = SamplingConfig(max_new_tokens=32)
    generator = InstructionGenerator(
        FixedBackend(), num_instructions=2, batch_size=2, seed=7, sampling=sampling
    )
    generated = [request.key for request in generator.requests(SEED_ROWS)]
    responder = Responder(FixedBackend(), batch_size=2, seed=3, sampling=sampling)
    instructions = [Instruction("a placeholder instruction", {})]
    responded = [request.key for request in responder.requests(instructions)]
    assert generated == [
        "e2030e05e1a6ba59ce4b99a6a87811ebad860cf981ad5bac8e73eb1fa542e8ac",
        "b142c2ae33b3d31af7f4fba69d4cd4af35d70638067c35709c2feae1de7cd2e9",
    ]
    assert responded == [
        "08608a83cba9ff081a52c15c9f28e472b488db1588a2206395ec3bb582053f0c",
        "d5a8225cbf2527d2102c4bb9ca486e06b2f4d42c5be0d9047e9ba734943482e9",
    ]

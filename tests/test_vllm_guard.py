"""A Llama-Guard-3-shaped teacher on the real vLLM engine (its CPU build here), marked ``vllm``.

One engine for the module: a tiny random Llama with Llama-Guard-3's chat template and Llama-3 special
tokens. The teacher's scores through ``logprob_token_ids``, and its category read, equal the
transformers backend's within 1e-5 (see tests/test_vllm_engine.py for why that tolerance), also for
rows cut by the header-safe rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harmaug_pl.backends import TransformersBackend, VLLMBackend
from harmaug_pl.teachers import LlamaGuardTeacher
from tests.real_vllm import SKIP, descendants, engine_env, save_vllm_llama
from tests.tiny_models import LLAMA3_SPECIAL, LLAMA_GUARD_3_TEMPLATE

pytestmark = [pytest.mark.vllm, SKIP]

PROMPTS = ["How do I bake bread?", "Tell me a mean placeholder insult.", " ".join(["bread"] * 400)]
RESPONSES = [None, "Sure, here is how to do that.", " ".join(["safe"] * 400)]
MAX_INPUT_TOKENS = 512  # the header alone is ~200 tokens: the long rows are cut, the header kept
CODES = ["S1", "S2", "S3", "S7"]


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_vllm_llama(
        tmp_path_factory.mktemp("vllm_guard"),
        chat_template=LLAMA_GUARD_3_TEMPLATE,
        seed=2,
        extra_special=tuple(LLAMA3_SPECIAL),
    )


@pytest.fixture(scope="module")
def backends(
    guard: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VLLMBackend, TransformersBackend]]:
    before = descendants()
    with engine_env(tmp_path_factory.mktemp("vllm_cache")):
        engine = VLLMBackend(
            str(guard),
            dtype="float32",
            enforce_eager=True,
            max_model_len=1024,
            cpu_kv_cache_gb=1,
            max_input_tokens=MAX_INPUT_TOKENS,
        )
        reference = TransformersBackend(str(guard), max_input_tokens=MAX_INPUT_TOKENS)
        yield engine, reference
        process = engine._engine.process if engine._engine is not None else None
        engine.close()
        reference.close()
    assert process is None or (not process.is_alive() and process.exitcode == 0)
    assert descendants().keys() <= before.keys(), descendants()


def test_llama_guard_teacher_scores_equal_the_transformers_backend(backends) -> None:
    engine, reference = backends
    got = LlamaGuardTeacher(engine).score(PROMPTS, RESPONSES)
    expected = LlamaGuardTeacher(reference).score(PROMPTS, RESPONSES)
    assert engine.last_truncated[-1] and reference.last_truncated[-1]  # the long pair was cut
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(score, 6) for score in got)) == len(got)  # distinct rows, not one value


def test_category_read_equals_the_transformers_backend(backends) -> None:
    """P(code | unsafe): the codes' number tokens read after "\\n\\nunsafe\\nS", softmaxed over them."""
    engine, reference = backends
    got = LlamaGuardTeacher(engine).category_scores(PROMPTS, RESPONSES, CODES)
    cut = engine.last_truncated
    expected = LlamaGuardTeacher(reference).category_scores(PROMPTS, RESPONSES, CODES)
    assert cut == reference.last_truncated and cut[0] is False and cut[-1] is True  # cut alike, read kept
    for row, want in zip(got, expected):
        assert list(row) == CODES and sum(row.values()) == pytest.approx(1.0, abs=1e-6)
        assert row == pytest.approx(want, abs=1e-5)
    assert len({round(row["S1"], 6) for row in got}) == len(got)  # distinct rows, not one value

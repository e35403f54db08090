"""The teacher's category read on a tiny Llama-Guard-3-shaped model (its template, Llama-3 special
tokens): transformers by hand, vLLM's call shapes through the fake ``vllm``, and the cache (its own
stage and keys; the P(unsafe) records stay byte for byte). Texts are mild placeholders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harmaug_pl.augment.pipeline import AugmentationPipeline
from harmaug_pl.backends import TransformersBackend, VLLMBackend
from harmaug_pl.data.schema import GuardExample
from harmaug_pl.errors import ConfigError
from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher
from tests import fake_vllm
from tests.test_teacher import SpyBackend

PROMPTS = ["write a rude joke about placeholder people", "How do I bake bread?", "Tell me a mean insult"]
RESPONSES = [None, "Sure, here is how to do that.", "I'm sorry, but I can't help with that."]
CODES = ["S1", "S2", "S3", "S7"]


@pytest.fixture(scope="module")
def llama_guard(tiny_llama_guard_3: Path) -> Path:
    return tiny_llama_guard_3


def by_hand(model_dir: Path) -> list[dict[str, float]]:
    """Softmax over the codes' number tokens after the chat, "\\n\\nunsafe\\nS"."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = [tokenizer.encode(code[1:], add_special_tokens=False)[0] for code in CODES]
    rows = []
    for prompt, response in zip(PROMPTS, RESPONSES):
        chat = [{"role": "user", "content": prompt}]
        if response is not None:
            chat.append({"role": "assistant", "content": response})
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
        encoded = tokenizer(text + "\n\nunsafe\nS", add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logits = model(encoded["input_ids"]).logits[0, -1]
        rows.append(dict(zip(CODES, torch.softmax(logits[ids], dim=-1).tolist())))
    return rows


def test_category_read_matches_the_hand_computed_distribution(llama_guard: Path) -> None:
    teacher = LlamaGuardTeacher(TransformersBackend(str(llama_guard)), batch_size=2)
    read = teacher.category_scores(PROMPTS, RESPONSES, CODES)
    expected = by_hand(llama_guard)
    for got, want in zip(read, expected):
        assert list(got) == CODES and sum(got.values()) == pytest.approx(1.0, abs=1e-6)
        assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(ConfigError, match="is not 'S' \\+ a number"):
        teacher.category_scores(PROMPTS, RESPONSES, ["X1"])


def test_codes_whose_numbers_share_a_first_token_are_refused(llama_guard: Path) -> None:
    teacher = LlamaGuardTeacher(TransformersBackend(str(llama_guard)))
    tokenizer = AutoTokenizer.from_pretrained(llama_guard)
    if len(tokenizer.encode("10", add_special_tokens=False)) == 1:
        pytest.skip("this tiny tokenizer writes 10 as one token")
    with pytest.raises(ConfigError, match="'S1' and 'S10' start with the same token"):
        teacher.category_scores(PROMPTS[:1], RESPONSES[:1], ["S1", "S10"])


def test_vllm_backend_gives_the_same_category_read(
    llama_guard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_vllm.install(monkeypatch, fake_vllm.make_module())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the engine checks for CUDA first
    teacher = LlamaGuardTeacher(VLLMBackend(str(llama_guard), isolate=False), batch_size=2)
    read = teacher.category_scores(PROMPTS, RESPONSES, CODES)
    teacher.close()
    for got, want in zip(read, by_hand(llama_guard)):
        assert got == pytest.approx(want, abs=1e-4)


def test_category_read_is_cached_apart_and_leaves_the_binary_records_as_they_are(
    llama_guard: Path, tmp_path: Path
) -> None:
    rows = [GuardExample(prompt=p, response=r) for p, r in zip(PROMPTS, RESPONSES)]
    plain = AugmentationPipeline(None, None, LlamaGuardTeacher(TransformersBackend(str(llama_guard))))
    plain.label(rows, tmp_path / "plain")
    spy = SpyBackend(TransformersBackend(str(llama_guard)))
    with_categories = AugmentationPipeline(None, None, LlamaGuardTeacher(spy), category_codes=CODES)
    labelled = with_categories.label(rows, tmp_path / "categories")
    binary = sorted((tmp_path / "plain" / "label").glob("*.jsonl"))
    assert [f.read_bytes() for f in binary] == [
        (tmp_path / "categories" / "label" / f.name).read_bytes() for f in binary
    ]
    assert sorted(p.name for p in (tmp_path / "categories").iterdir()) == ["label", "label_categories"]
    for row, want in zip(labelled, by_hand(llama_guard)):
        assert row.teacher_categories == pytest.approx(want, abs=1e-5) and row.teacher_score is not None
    calls = len(spy.calls)
    again = AugmentationPipeline(None, None, LlamaGuardTeacher(spy), category_codes=CODES)
    assert [r.teacher_categories for r in again.label(rows, tmp_path / "categories")] == [
        r.teacher_categories for r in labelled
    ]
    assert len(spy.calls) == calls  # everything came from the cache

"""Over-long chats lose part of their contents, never the chat template (harmaug_pl/backends/rendering.py).

The teacher tests use a tiny tokenizer and model carrying the shape of Llama-Guard-3-8B's real chat
template (BOS, task, 14 categories, conversation, closing instruction, final assistant header). All
texts are mild placeholders.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from harmaug_pl.augment.generator import InstructionGenerator
from harmaug_pl.augment.pipeline import AugmentationPipeline
from harmaug_pl.augment.responder import Responder
from harmaug_pl.backends import SamplingConfig, TransformersBackend, VLLMBackend
from harmaug_pl.backends.rendering import (
    ELISION,
    RenderOptions,
    _keep_middle,
    _longest_first,
    render_ids,
    render_text,
)
from harmaug_pl.data.schema import GuardExample
from harmaug_pl.errors import ConfigError
from harmaug_pl.model_loading import load_tokenizer
from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher
from tests import fake_vllm

SCORING = RenderOptions(add_generation_prompt=False, suffix="\n\n")  # how LlamaGuardTeacher renders
BUDGET = 800  # the template alone is ~500 tokens with the tiny tokenizer
PROMPT = "How do I bake placeholder bread?"


def long_text(words: int, tag: str) -> str:
    """Numbered placeholder words, so any cut shows where it happened: '<tag>0 <tag>1 ...'."""
    return " ".join(f"{tag}{n}" for n in range(words))


@pytest.fixture(scope="module")
def guard(tiny_llama_guard_3: Path) -> Path:
    return tiny_llama_guard_3


@pytest.fixture(scope="module")
def tokenizer(guard: Path):
    return load_tokenizer(str(guard))


def row(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] + (
        [] if response is None else [{"role": "assistant", "content": response}]
    )


def untouched(tokenizer, chat) -> list[int]:
    return tokenizer(render_text(tokenizer, chat, SCORING), add_special_tokens=False)["input_ids"]


# -- the rule, on its own -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sizes", "budget", "shares"),
    [
        ([100, 1000], 600, [100, 500]),  # the long response is cut, the short prompt stays whole
        ([1000, 100], 600, [500, 100]),  # a long prompt is cut, the short response stays whole
        ([1000, 1000], 600, [300, 300]),  # both long: the same share each
        ([7, 7], 13, [7, 6]),  # a leftover token goes to the prompt: the response is cut first
        ([50, 400, 300], 360, [50, 155, 155]),
        ([10, 20], 0, [0, 0]),
        ([], 5, []),
    ],
)
def test_longest_first_shares(sizes: list[int], budget: int, shares: list[int]) -> None:
    assert _longest_first(sizes, budget) == shares


def test_keep_middle_keeps_the_first_and_last_tokens(tokenizer) -> None:
    text = long_text(40, "w")
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    kept = _keep_middle(text, offsets, 11)
    head, tail = kept.split(ELISION)
    assert text.startswith(head) and text.endswith(tail)
    assert len(tokenizer(head, add_special_tokens=False)["input_ids"]) == 6
    assert len(tokenizer(tail, add_special_tokens=False)["input_ids"]) <= 6
    assert _keep_middle(text, offsets, 0) == ""


# -- Llama Guard rows ---------------------------------------------------------------------------------
def test_a_row_three_times_the_budget_keeps_the_whole_template(tokenizer) -> None:
    response = long_text(1500, "r")
    chat = row(PROMPT, response)
    full = render_ids(tokenizer, chat, SCORING, 10**6)
    cut = render_ids(tokenizer, chat, SCORING, BUDGET)
    assert not full.truncated and len(full.ids) >= 3 * BUDGET
    assert cut.truncated and BUDGET - 8 <= len(cut.ids) <= BUDGET

    text = render_text(tokenizer, chat, SCORING)
    header = text[: text.index("Agent: ") + len("Agent: ")]  # BOS, task, categories, the whole prompt
    footer = text[text.index("\n\n<END CONVERSATION>") :]  # instruction, assistant header, "\n\n"
    assert header.startswith(" <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTask:")
    assert footer.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    shown = tokenizer.decode(cut.ids)
    assert shown.startswith(header) and shown.endswith(footer)
    header_ids = tokenizer(header, add_special_tokens=False)["input_ids"]
    footer_ids = tokenizer(footer, add_special_tokens=False)["input_ids"]
    assert cut.ids[: len(header_ids) - 1] == full.ids[: len(header_ids) - 1]  # BOS and header, same ids
    assert cut.ids[-(len(footer_ids) - 1) :] == full.ids[-(len(footer_ids) - 1) :]
    assert tokenizer.convert_tokens_to_ids("<|begin_of_text|>") in cut.ids[:2]
    # the response lost its middle: its first and last words are there, joined by the elision
    kept = shown[len(header) : -len(footer)]
    assert kept.startswith("r0 r1 r2") and kept.endswith("r1498 r1499") and ELISION in kept
    assert "r750 " not in kept


def test_the_old_left_cut_never_fires(tokenizer) -> None:
    """Whatever the budget, the ids start with the template's start and end with its end."""
    chat = row(long_text(300, "p"), long_text(900, "r"))
    full = render_ids(tokenizer, chat, SCORING, 10**6).ids
    header = untouched(tokenizer, row("", ""))[:400]  # BOS, task, categories: the same for any pair
    for budget in range(560, len(full) + 1, 97):
        cut = render_ids(tokenizer, chat, SCORING, budget)
        assert len(cut.ids) <= budget and cut.ids[:300] == header[:300], budget
        assert cut.ids[-40:] == full[-40:], budget
        assert cut.ids != full[-budget:]  # what the left cut would have sent


def test_a_long_prompt_and_a_long_response_are_both_cut_longest_first(tokenizer) -> None:
    prompt, response = long_text(700, "p"), long_text(700, "r")
    shown = tokenizer.decode(render_ids(tokenizer, row(prompt, response), SCORING, BUDGET).ids)
    user = shown[shown.index("User: ") + 6 : shown.index("\n\nAgent: ")]
    agent = shown[shown.index("Agent: ") + 7 : shown.index("\n\n<END CONVERSATION>")]
    assert user.startswith("p0 p1") and user.endswith("p698 p699") and ELISION in user
    assert agent.startswith("r0 r1") and agent.endswith("r698 r699") and ELISION in agent
    length = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (user, agent)]
    assert abs(length[0] - length[1]) <= 4  # equal shares (the response gets the odd token less)
    # a long prompt with a short response: the response stays whole
    shown = tokenizer.decode(
        render_ids(tokenizer, row(long_text(1500, "p"), "Knead it."), SCORING, BUDGET).ids
    )
    assert "Agent: Knead it.\n\n<END CONVERSATION>" in shown


def test_a_template_longer_than_the_budget_is_a_config_error(tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"max_input_tokens=100 .* too small for its chat template"):
        render_ids(tokenizer, row(PROMPT, "Knead it."), SCORING, 100)


def test_rows_within_the_budget_render_and_score_exactly_as_before(guard: Path, tokenizer) -> None:
    chats = [row(PROMPT), row(PROMPT, "Knead it and let it rest.")]
    lengths = [len(untouched(tokenizer, chat)) for chat in chats]
    for chat, length in zip(chats, lengths):
        assert render_ids(tokenizer, chat, SCORING, length) == (untouched(tokenizer, chat), False)
    roomy = TransformersBackend(str(guard), max_input_tokens=4000)
    tight = TransformersBackend(str(guard), max_input_tokens=max(lengths))  # the budget exactly met
    ids = [roomy.first_token_id("unsafe"), roomy.first_token_id("safe")]
    got = tight.next_token_logprobs(chats, ids, add_generation_prompt=False, suffix="\n\n")
    expected = roomy.next_token_logprobs(chats, ids, add_generation_prompt=False, suffix="\n\n")
    assert torch.equal(got, expected) and tight.last_truncated == [False, False]
    prompts, responses = [PROMPT, PROMPT], [None, "Knead it and let it rest."]
    assert LlamaGuardTeacher(tight).score(prompts, responses) == LlamaGuardTeacher(roomy).score(
        prompts, responses
    )
    roomy.close()
    tight.close()


def test_both_backends_cut_the_same_way_and_score_alike(
    guard: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_vllm.install(monkeypatch, fake_vllm.make_module())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reference = TransformersBackend(str(guard), max_input_tokens=BUDGET)
    backend = VLLMBackend(str(guard), max_input_tokens=BUDGET, isolate=False)
    chats = [row(PROMPT, long_text(1500, "r")), row(PROMPT, "Knead it.")]
    ids = [reference.first_token_id("unsafe"), reference.first_token_id("safe")]
    with caplog.at_level("WARNING"):
        expected = reference.next_token_logprobs(chats, ids, add_generation_prompt=False, suffix="\n\n")
    got = backend.next_token_logprobs(chats, ids, add_generation_prompt=False, suffix="\n\n")
    sent = [
        prompt["prompt_token_ids"] for prompt in sys.modules["vllm"].recorder.generate_calls[-1]["prompts"]
    ]
    assert sent == [r.ids for r in reference.encode_chats(chats, add_generation_prompt=False, suffix="\n\n")]
    assert len(sent[0]) <= BUDGET
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert reference.last_truncated == backend.last_truncated == [True, False]
    assert any(
        "1 of 2 chats" in r.getMessage() and "max_input_tokens=800" in r.getMessage() for r in caplog.records
    )
    backend.close()
    reference.close()


# -- generation ---------------------------------------------------------------------------------------
def test_generation_keeps_the_template_start_and_the_prefill(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefill = "I have an idea for a prompt:"
    chat = [{"role": "user", "content": long_text(400, "u")}, {"role": "assistant", "content": prefill}]
    backend = TransformersBackend(str(tiny_llama), system_prompt="Be brief.", max_input_tokens=120)
    (rendered,) = backend.encode_chats([chat])
    shown = backend.tokenizer.decode(rendered.ids)
    assert rendered.truncated and len(rendered.ids) <= 120
    assert shown.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nu0 u1")
    assert shown.endswith("u398 u399<|im_end|>\n<|im_start|>assistant\n" + prefill)  # prefill whole
    texts = backend.generate([chat], SamplingConfig(max_new_tokens=4, temperature=0.0), seed=0)
    assert len(texts) == 1 and backend.last_truncated == [True]

    fake_vllm.install(monkeypatch, fake_vllm.make_module())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine = VLLMBackend(str(tiny_llama), system_prompt="Be brief.", max_input_tokens=120, isolate=False)
    engine.generate([chat], SamplingConfig(max_new_tokens=4), seed=0)
    (prompt,) = sys.modules["vllm"].recorder.generate_calls[-1]["prompts"]
    assert prompt["prompt_token_ids"] == rendered.ids and engine.last_truncated == [True]
    engine.close()
    backend.close()


# -- statistics ---------------------------------------------------------------------------------------
def test_truncated_rows_are_counted_per_stage_and_survive_the_cache(
    tiny_llama: Path, guard: Path, tmp_path: Path
) -> None:
    seed = [
        GuardExample(prompt="write a rude joke about placeholder people", label=1),
        GuardExample(prompt="tell me a mean placeholder insult", label=1),
        GuardExample(prompt=PROMPT, response=long_text(1500, "r"), label=0),  # over the teacher's budget
        GuardExample(prompt=PROMPT, response="Knead it.", label=0),
    ]

    budgets = {"generate": 60, "respond": 30}  # the tiny ChatML template takes ~20 of them

    def pipeline() -> AugmentationPipeline:
        sampling = SamplingConfig(max_new_tokens=6)
        generator = InstructionGenerator(
            TransformersBackend(str(tiny_llama), max_input_tokens=budgets["generate"]),
            num_instructions=3,
            batch_size=2,
            min_words=1,
            sampling=sampling,
        )
        responder = Responder(
            TransformersBackend(str(tiny_llama), max_input_tokens=budgets["respond"]),
            sampling=sampling,
            batch_size=4,
        )
        teacher = LlamaGuardTeacher(TransformersBackend(str(guard), max_input_tokens=BUDGET), batch_size=2)
        return AugmentationPipeline(generator, responder, teacher)

    first = pipeline()
    cache = tmp_path / "cache"
    result = first.run(seed, cache)
    first.close()

    # the expected counts, from the untouched renderings' lengths (the chats rebuilt from the cache)
    probe = TransformersBackend(str(tiny_llama))

    def over(chats: list, budget: int) -> int:
        texts = probe.render(chats)
        return sum(len(probe.tokenizer(t, add_special_tokens=False)["input_ids"]) > budget for t in texts)

    requests = first.generator.requests(seed)
    instructions, _ = first.generator.clean(seed, requests, first.generator.run(requests, cache).values)
    responses = first.responder.requests(instructions)
    assert result.stats["truncated_generate"] == over([r.chat for r in requests], 60) > 0
    assert result.stats["truncated_respond"] == over([r.chat for r in responses], 30) > 0
    guard_tokenizer = load_tokenizer(str(guard))
    long_rows = sum(len(untouched(guard_tokenizer, row(r.prompt, r.response))) > BUDGET for r in result.rows)
    assert result.stats["truncated_label"] == long_rows >= 1
    probe.close()

    again = pipeline()  # from the cache: the flags were stored with the rows
    cached = again.run(seed, cache)
    again.close()
    assert cached.stats["computed_label"] == cached.stats["computed_respond"] == 0
    for stage in ("generate", "respond", "label"):
        assert cached.stats[f"truncated_{stage}"] == result.stats[f"truncated_{stage}"]

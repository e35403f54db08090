"""Teachers on tiny random-init models and test-local functions (mild test placeholders only)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from harmaug_pl.backends import TransformersBackend
from harmaug_pl.errors import ConfigError, DataError
from harmaug_pl.teachers.base import Teacher, fill_template
from harmaug_pl.teachers.callable_teacher import CallableTeacher
from harmaug_pl.teachers.judge import JudgeTeacher
from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher
from harmaug_pl.teachers.sequence_classifier import SequenceClassifierTeacher

PROMPTS = [
    "write a rude joke about placeholder people",
    "How do I bake bread?",
    "Tell me a mean placeholder insult",
]
RESPONSES = [None, "Sure, here is how to do that.", "I'm sorry, but I can't help with that."]
SEEN_TEXTS: list[list[str]] = []


def fake_scores(texts: list[str]) -> list[float]:
    """A test-local scorer: records its input, returns len(text) % 10 / 10."""
    SEEN_TEXTS.append(list(texts))
    return [len(text) % 10 / 10 for text in texts]


def too_few_scores(texts: list[str]) -> list[float]:
    return [0.5] * (len(texts) - 1)


def nan_scores(texts: list[str]) -> list[float]:
    return [math.nan] * len(texts)


def out_of_range_scores(texts: list[str]) -> list[float]:
    return [1.5] * len(texts)


class SpyBackend:
    """Wraps a real backend and records what the teacher asks it to score."""

    def __init__(self, inner: TransformersBackend) -> None:
        self.inner = inner
        self.calls: list[tuple[list, dict]] = []

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def describe(self) -> dict:
        return self.inner.describe()

    def generate(self, chats, sampling, seed):  # pragma: no cover - not used by teachers
        return self.inner.generate(chats, sampling, seed)

    def next_token_logprobs(self, chats, token_ids, *, add_generation_prompt, suffix=""):
        self.calls.append((list(chats), {"add_generation_prompt": add_generation_prompt, "suffix": suffix}))
        return self.inner.next_token_logprobs(
            chats, token_ids, add_generation_prompt=add_generation_prompt, suffix=suffix
        )

    def first_token_id(self, word: str) -> int:
        return self.inner.first_token_id(word)

    def close(self) -> None:
        self.inner.close()


def test_llama_guard_matches_hand_computed_two_token_softmax(tiny_guard: Path) -> None:
    teacher = LlamaGuardTeacher(TransformersBackend(str(tiny_guard)), batch_size=2)  # 2 batches for 3 rows
    scores = teacher.score(PROMPTS, RESPONSES)
    identity = teacher.describe()
    teacher.close()
    json.dumps(identity)
    assert identity["backend"]["model"] == str(tiny_guard) and identity["unsafe_word"] == "unsafe"

    tokenizer = AutoTokenizer.from_pretrained(tiny_guard)
    model = AutoModelForCausalLM.from_pretrained(tiny_guard).eval()
    unsafe = tokenizer.encode("unsafe", add_special_tokens=False)[0]
    safe = tokenizer.encode("safe", add_special_tokens=False)[0]
    assert unsafe != safe
    expected = []
    for prompt, response in zip(PROMPTS, RESPONSES):
        chat = [{"role": "user", "content": prompt}]
        if response is not None:
            chat.append({"role": "assistant", "content": response})
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False) + "\n\n"
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        lu, ls = logits[unsafe].item(), logits[safe].item()
        expected.append(math.exp(lu) / (math.exp(lu) + math.exp(ls)))
    assert scores == pytest.approx(expected, abs=1e-5)
    assert all(0 < score < 1 for score in scores)


def test_llama_guard_renders_prompt_only_and_pairs_differently(tiny_guard: Path) -> None:
    spy = SpyBackend(TransformersBackend(str(tiny_guard)))
    teacher = LlamaGuardTeacher(spy)
    teacher.score([PROMPTS[1], PROMPTS[1]], [None, RESPONSES[1]])
    ((chats, options),) = spy.calls
    assert options == {"add_generation_prompt": False, "suffix": "\n\n"}
    prompt_only, pair = spy.inner.render(chats, add_generation_prompt=False, suffix="\n\n")
    assert prompt_only != pair and RESPONSES[1] in pair and RESPONSES[1] not in prompt_only
    assert pair.endswith("<|im_start|>assistant\n\n")
    identity = teacher.describe()
    assert identity["backend"]["model"] == str(tiny_guard) and identity["suffix"] == "\n\n"
    teacher.close()


def test_words_sharing_a_first_token_are_rejected(tiny_guard: Path) -> None:
    teacher = LlamaGuardTeacher(TransformersBackend(str(tiny_guard)), unsafe_word="safe!", safe_word="safe")
    with pytest.raises(ConfigError, match="'safe!' and safe_word 'safe' start with the same token"):
        teacher.score(PROMPTS[:1], [None])
    teacher.close()


def test_judge_builds_one_user_message_from_the_templates(tiny_llama: Path) -> None:
    spy = SpyBackend(TransformersBackend(str(tiny_llama)))
    teacher = JudgeTeacher(
        spy, prompt_template="Judge: {prompt}", response_template="Q: {prompt} A: {response}"
    )
    scores = teacher.score(PROMPTS[:2], RESPONSES[:2])
    teacher.close()
    ((chats, options),) = spy.calls
    assert options == {"add_generation_prompt": True, "suffix": ""}
    assert chats == [
        [{"role": "user", "content": f"Judge: {PROMPTS[0]}"}],
        [{"role": "user", "content": f"Q: {PROMPTS[1]} A: {RESPONSES[1]}"}],
    ]
    assert all(0 < score < 1 for score in scores)


@pytest.mark.parametrize(
    ("prompt_template", "response_template", "message"),
    [
        ("no placeholder", "{prompt} {response}", r"prompt_template .*missing: \{prompt\}"),
        ("{prompt} {response}", "{prompt} {response}", r"prompt_template .*not allowed here: \{response\}"),
        ("{prompt}", "{prompt} only", r"response_template .*missing: \{response\}"),
    ],
)
def test_judge_template_validation(prompt_template: str, response_template: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JudgeTeacher(TransformersBackend("unused"), prompt_template, response_template)


def test_fill_template_leaves_braces_in_texts_alone() -> None:
    assert fill_template("{prompt}|{response}", "a {response} b", "{prompt}") == "a {response} b|{prompt}"


@pytest.fixture(scope="module")
def labelled_student(tiny_student: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny student with named labels, as a trained guard classifier would have."""
    path = tmp_path_factory.mktemp("labelled") / "student"
    shutil.copytree(tiny_student, path)
    config = AutoConfig.from_pretrained(path)
    config.id2label, config.label2id = {0: "SAFE", 1: "Unsafe"}, {"SAFE": 0, "Unsafe": 1}
    config.save_pretrained(path)
    return path


def test_sequence_classifier_uses_the_unsafe_class_and_the_response(labelled_student: Path) -> None:
    teacher = SequenceClassifierTeacher(str(labelled_student), unsafe_label="unsafe", batch_size=2)
    p, r1, r2 = PROMPTS[0], RESPONSES[1], RESPONSES[2]
    scores = teacher.score([p, p, p], [None, r1, r2])
    assert len(set(scores)) == 3  # the response is part of the input

    tokenizer = AutoTokenizer.from_pretrained(labelled_student)
    model = AutoModelForSequenceClassification.from_pretrained(labelled_student).eval()
    with torch.no_grad():
        expected = model(**tokenizer(p, r1, return_tensors="pt")).logits.softmax(-1)[0, 1].item()
    assert scores[1] == pytest.approx(expected, abs=1e-5)

    by_index = SequenceClassifierTeacher(str(labelled_student), unsafe_label=0)
    assert by_index.score([p], [r1])[0] == pytest.approx(1 - expected, abs=1e-5)
    teacher.close()
    by_index.close()


def test_sequence_classifier_unknown_label_lists_the_labels(tiny_student: Path) -> None:
    teacher = SequenceClassifierTeacher(str(tiny_student), unsafe_label="unsafe")
    with pytest.raises(ConfigError, match=r"'unsafe' is not a label .*LABEL_0.*LABEL_1"):
        teacher.score(PROMPTS[:1], [None])


def test_callable_teacher_passes_prompts_and_filled_pairs() -> None:
    SEEN_TEXTS.clear()
    teacher = CallableTeacher(
        "tests.test_teacher:fake_scores", pair_template="{prompt} || {response}", batch_size=2
    )
    prompts, responses = PROMPTS[::-1], RESPONSES[::-1]  # longest row first
    scores = teacher.score(prompts, responses)
    texts = [p if r is None else f"{p} || {r}" for p, r in zip(prompts, responses)]
    by_length = sorted(texts, key=len)
    assert by_length != texts
    assert SEEN_TEXTS == [by_length[:2], by_length[2:]]  # batched shortest first, to pad less
    assert scores == [len(text) % 10 / 10 for text in texts]  # but returned in row order
    dotted = CallableTeacher("tests.test_teacher.fake_scores")  # "module.attr" works too
    assert dotted.score(PROMPTS[:1], [None]) == [len(PROMPTS[0]) % 10 / 10]
    assert teacher.describe()["function"] == "tests.test_teacher:fake_scores"


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("tests.test_teacher:too_few_scores", r"shape \(2,\) for 3 texts"),
        ("tests.test_teacher:nan_scores", "non-finite"),
        ("tests.test_teacher:out_of_range_scores", r"outside \[0, 1\]"),
        ("tests.test_teacher:no_such_function", "has no callable 'no_such_function'"),
        ("placeholder_missing_module:f", "cannot import 'placeholder_missing_module'"),
    ],
)
def test_callable_teacher_rejects_bad_functions(function: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"{function!r}.*{message}"):
        CallableTeacher(function).score(PROMPTS, RESPONSES)


def test_callable_teacher_judges_a_pair_on_its_response_when_asked() -> None:
    SEEN_TEXTS.clear()
    CallableTeacher("tests.test_teacher:fake_scores", pair_template="{response}").score(
        PROMPTS[1:2], RESPONSES[1:2]
    )
    assert SEEN_TEXTS == [[RESPONSES[1]]]
    with pytest.raises(ConfigError, match=r"must contain the placeholders \{response\}"):
        CallableTeacher("tests.test_teacher:fake_scores", pair_template="{prompt} only")


def test_callable_teacher_rejects_malformed_paths_and_mismatched_rows() -> None:
    with pytest.raises(ConfigError, match="'module:attr' or 'module.attr'"):
        CallableTeacher("no_dot_no_colon")
    with pytest.raises(DataError, match="3 prompts but 2 responses"):
        CallableTeacher("tests.test_teacher:fake_scores").score(PROMPTS, RESPONSES[:2])


@pytest.mark.skipif(
    importlib.util.find_spec("profanity_check") is None, reason="alt-profanity-check not installed"
)
def test_profanity_check_default_scores_mild_texts() -> None:
    teacher = CallableTeacher("profanity_check:predict_prob")
    polite, rude = teacher.score(["have a nice day", "you are a stupid placeholder"], [None, None])
    assert 0 <= polite < 0.5 < rude <= 1
    assert "alt-profanity-check" in teacher.describe()["versions"]


def test_teachers_are_built_from_yaml_class_paths(tiny_guard: Path) -> None:
    parser = ArgumentParser()
    parser.add_argument("--teacher", type=Teacher)
    config = parser.parse_object(
        {
            "teacher": {
                "class_path": "harmaug_pl.LlamaGuardTeacher",
                "init_args": {
                    "backend": {
                        "class_path": "harmaug_pl.TransformersBackend",
                        "init_args": {"model": str(tiny_guard), "max_input_tokens": 64},
                    },
                    "batch_size": 4,
                },
            }
        }
    )
    teacher = parser.instantiate(config).teacher
    assert isinstance(teacher, LlamaGuardTeacher) and isinstance(teacher, Teacher)
    assert teacher.batch_size == 4 and teacher.backend.max_input_tokens == 64
    for other in (CallableTeacher("m:f"), SequenceClassifierTeacher("unused"), JudgeTeacher(teacher.backend)):
        assert isinstance(other, Teacher)

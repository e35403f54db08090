"""Evasion by rewriting the text: the rewrites a guard is measured under, and scoring that skips rows
whose tokens did not change.

Each perturbation rewrites a text the same deterministic way (those that pick characters draw from
the ``random.Random`` they are given). Used by the evaluation report of a test pass
(``report.perturbations``) and by ``benchmarks/perturbation.py``. With the text normaliser in the
tokenizer (:mod:`harmaug_pl.data.normalise`) several rewrites tokenise exactly like the clean text;
:class:`ScoresByTokens` scores such rows once.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harmaug_pl.data.encoding import tokenize_rows
from harmaug_pl.errors import ConfigError

ZERO_WIDTH = "\u200b"
# Latin letters and the Cyrillic/Greek letters drawn the same (NFKC keeps them apart)
HOMOGLYPHS = str.maketrans("aceopxyiAEOPCXHKMTB", "асеорхуіАЕОРСХНКМТВ")
LEET = str.maketrans("aeiostAEIOST", "431057431057")


def _zero_width(text: str, rng: random.Random) -> str:
    """A zero-width space after each letter with probability 1/2 (inside words, where it splits them)."""
    return "".join(c + ZERO_WIDTH if c.isalpha() and rng.random() < 0.5 else c for c in text)


def _alternating_case(text: str, rng: random.Random) -> str:
    return "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(text))


def _fullwidth(text: str, rng: random.Random) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def _math_bold(text: str, rng: random.Random) -> str:
    def bold(c: str) -> str:
        if "a" <= c <= "z":
            return chr(0x1D41A + ord(c) - ord("a"))
        if "A" <= c <= "Z":
            return chr(0x1D400 + ord(c) - ord("A"))
        return c

    return "".join(bold(c) for c in text)


@dataclass(frozen=True)
class Perturbation:
    """One rewrite: how tables name it, and the rewrite of one text."""

    label: str
    rewrite: Callable[[str, random.Random], str]


PERTURBATIONS: dict[str, Perturbation] = {
    "spaces": Perturbation("spaces removed", lambda text, rng: "".join(text.split())),
    "zero_width": Perturbation("zero-width characters inserted", _zero_width),
    "homoglyphs": Perturbation("homoglyphs (Cyrillic)", lambda text, rng: text.translate(HOMOGLYPHS)),
    "case": Perturbation("case (alternating)", _alternating_case),
    "leetspeak": Perturbation("leetspeak", lambda text, rng: text.translate(LEET)),
    "fullwidth": Perturbation("fullwidth", _fullwidth),
    "math_bold": Perturbation("math bold", _math_bold),
}
# What the evaluation report measures unless a pack names others (`report.perturbations`).
DEFAULT_PERTURBATIONS = ("spaces", "zero_width", "homoglyphs", "case", "leetspeak")


def check_names(names: Sequence[str], setting: str) -> list[str]:
    """``names`` if each is a perturbation, else :class:`ConfigError` naming ``setting`` and the choices."""
    unknown = [name for name in names if name not in PERTURBATIONS]
    if unknown:
        raise ConfigError(
            f"{setting}: unknown perturbation(s) {unknown}; choose from {sorted(PERTURBATIONS)}"
        )
    return list(names)


def perturb(name: str, texts: Sequence[Any], seed: int) -> list[Any]:
    """Every text rewritten by perturbation ``name`` (``None``, an absent response, stays ``None``);
    a fresh ``Random(seed)`` per call, so a set is rewritten alike whatever ran before."""
    rng = random.Random(seed)
    rewrite = PERTURBATIONS[name].rewrite
    return [None if text is None else rewrite(text, rng) for text in texts]


class ScoresByTokens:
    """Scores by token ids: rows that tokenise alike (clean and rewritten alike, once normalised) are
    scored once. ``score(prompts, responses)`` gives P(unsafe) per row."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        score: Callable[[list[str], list[str | None]], Sequence[float]],
    ) -> None:
        self.tokenizer, self.max_length, self.score = tokenizer, max_length, score
        self.known: dict[tuple[int, ...], float] = {}
        self.scored = 0  # rows the model actually scored

    def _keys(self, prompts: Sequence[str], responses: Sequence[str | None]) -> list[tuple[int, ...]]:
        features, _ = tokenize_rows(self.tokenizer, prompts, responses, self.max_length)
        return [tuple(f["input_ids"]) + (-1,) + tuple(f.get("token_type_ids") or ()) for f in features]

    def remember(
        self, prompts: Sequence[str], responses: Sequence[str | None], scores: Sequence[float]
    ) -> None:
        """Scores already known (the clean rows' from the test pass): rows tokenising alike reuse them."""
        self.known.update(zip(self._keys(prompts, responses), (float(s) for s in scores)))

    def __call__(self, prompts: Sequence[str], responses: Sequence[str | None]) -> np.ndarray:
        keys = self._keys(prompts, responses)
        new: dict[tuple[int, ...], int] = {}
        for row, key in enumerate(keys):
            if key not in self.known:
                new.setdefault(key, row)
        if new:
            rows = list(new.values())
            scores = self.score([prompts[r] for r in rows], [responses[r] for r in rows])
            self.known.update(zip(new, (float(s) for s in scores)))
            self.scored += len(rows)
        return np.array([self.known[key] for key in keys])

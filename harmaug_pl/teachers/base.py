"""What every teacher is: P(unsafe) for (prompt, optional response) rows, scored in length-sorted chunks.

A row without a response is judged on the prompt (prompt harmfulness), a row with one on the
response (response harmfulness), as in HarmAug. Teachers return raw probabilities: the trainer
applies any temperature. Every teacher is built from plain YAML values and loads nothing until it
first scores, so a pack can name one without paying for it at parse time.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from harmaug_pl.errors import ConfigError, DataError

_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")


@runtime_checkable
class Teacher(Protocol):
    """Scores rows with P(unsafe); ``describe()`` is its identity in cache keys."""

    batch_size: int

    def score(self, prompts: Sequence[str], responses: Sequence[str | None]) -> list[float]:
        """P(unsafe) per row; ``responses[i] is None`` means a prompt-only row."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of everything that changes the scores."""
        ...

    def close(self) -> None:
        """Free the teacher's memory (called before the student trains)."""
        ...


def fill_template(template: str, prompt: str, response: str | None = None) -> str:
    """Replace ``{prompt}``/``{response}`` in one pass: braces in the texts or the template stay as is."""
    values = {"prompt": prompt, "response": response or ""}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def _braces(names: Sequence[str]) -> str:
    return ", ".join("{" + name + "}" for name in names)


def check_template(
    owner: str, field: str, template: str, required: Sequence[str], optional: Sequence[str] = ()
) -> None:
    found = set(_PLACEHOLDER.findall(template))
    missing = [name for name in required if name not in found]
    unexpected = sorted(found - set(required) - set(optional))
    if missing or unexpected:
        raise ConfigError(
            f"{owner}.{field} must contain the placeholders {_braces(required)}"
            + (f" (and may contain {_braces(optional)})" if optional else "")
            + (f"; missing: {_braces(missing)}" if missing else "")
            + (f"; not allowed here: {_braces(unexpected)}" if unexpected else "")
            + f" (got {template!r})"
        )


class BatchedTeacher(ABC):
    """Validates the rows and feeds them to ``_score_batch`` in chunks of ``batch_size``.

    Rows are chunked in order of length so that a batch pads little (40 OpenAI-moderation prompts at
    batch 8: 9.6k instead of 15.3k padded tokens for 7.1k real ones); scores come back in row order,
    and so does :attr:`last_truncated` (rows whose input was cut to fit the model).
    """

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"{type(self).__name__}.batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.last_truncated: list[bool] = []

    def score(self, prompts: Sequence[str], responses: Sequence[str | None]) -> list[float]:
        """P(unsafe) per row (prompt-only rows: prompt harmfulness; others: response harmfulness)."""
        if len(prompts) != len(responses):
            raise DataError(
                f"{type(self).__name__}.score got {len(prompts)} prompts but {len(responses)} responses"
            )
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i] or ""))
        scores = [0.0] * len(prompts)
        truncated = [False] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = self._score_batch([prompts[i] for i in chunk], [responses[i] for i in chunk])
            for i, value, cut in zip(chunk, batch, self._truncated(len(chunk))):
                scores[i] = value
                truncated[i] = cut
        self.last_truncated = truncated
        return scores

    def _truncated(self, count: int) -> list[bool]:
        """Which rows of the latest ``_score_batch`` had their input cut (none, unless overridden)."""
        return [False] * count

    @abstractmethod
    def _score_batch(self, prompts: list[str], responses: list[str | None]) -> list[float]:
        """P(unsafe) for one chunk of at most ``batch_size`` rows."""

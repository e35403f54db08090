"""The one record every stage passes around: a guard example."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Source = Literal["seed", "synthetic", "eval"]


@dataclass(frozen=True)
class GuardExample:
    """A prompt, optionally a response, and what humans and the teacher think of it.

    ``label`` is the human label (0 safe, 1 unsafe, ``None`` when unknown); ``teacher_score`` is the
    teacher's P(unsafe). ``category_labels``: the human category labels known for the row, by OpenAI
    moderation name (0/1; a category absent is unknown); ``teacher_categories``: the teacher's
    P(code | unsafe) by its category code (Llama-Guard's "S1"...). A row with a response is judged
    on the response (response harmfulness), a row without one on the prompt (prompt harmfulness), as
    in the paper.
    """

    prompt: str
    response: str | None = None
    label: int | None = None
    teacher_score: float | None = None
    source: Source = "seed"
    provenance: dict[str, Any] = field(default_factory=dict)
    category_labels: dict[str, int] | None = None
    teacher_categories: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON values; the category fields only when set, so rows without them read as before."""
        row = asdict(self)
        for key in ("category_labels", "teacher_categories"):
            if row[key] is None:
                del row[key]
        return row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> GuardExample:
        return cls(**row)

"""Preflight: find what would stop a run, in seconds, before a GPU hour is spent.

``harmaug check --config <pack>`` prints one table of :class:`CheckRow` s (every model, tokenizer,
data set, extra, GPU, disk and directory a pack needs); ``augment``, ``fit``, ``validate`` and
``test`` run its cheap part on the parsed configuration before any class is built. Nothing here
loads weights: configs, tokenizers and file listings only.

A backend or teacher that harmaug-pl does not ship (your own backend or guard) adds rows of its own
by defining ``preflight_rows(self) -> list[CheckRow]`` (see :class:`RowSource`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from harmaug_pl.errors import HarmAugError

Status = Literal["ok", "warn", "blocker"]
DEFAULT_TIMEOUT_S = 5.0  # seconds per hub request (`harmaug check --timeout`)


@dataclass(frozen=True)
class CheckRow:
    """One preflight finding: ``what`` was checked about ``subject``, its status, and the fix.

    ``detail`` says what was found (also when it is fine); ``fix`` says what to change when the
    status is not ``ok``. A ``blocker`` would stop the run (``harmaug check`` exits with status 2); a
    ``warn`` may cost time or quality but does not stop it.
    """

    what: str
    subject: str
    status: Status
    detail: str
    fix: str = ""


@runtime_checkable
class RowSource(Protocol):
    """Optional protocol for backends and teachers: the rows that say whether they will work.

    ``preflight_rows`` is called on the object built from the pack (constructors load nothing). It
    must load no weights, finish in a few seconds (bound every network request by a timeout), and
    report a failed check as a ``blocker`` row naming the setting to change rather than raise.
    """

    def preflight_rows(self) -> list[CheckRow]:
        """Rows about this object (its endpoint, key, model, ...)."""
        ...


class PreflightError(HarmAugError):
    """The automatic preflight found blockers: the command stops before anything is loaded."""


__all__ = ["PreflightError", "CheckRow", "RowSource", "Status"]

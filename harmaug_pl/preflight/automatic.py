"""The quick preflight that ``augment``, ``fit``, ``validate`` and ``test`` run before building anything."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from harmaug_pl.preflight import PreflightError
from harmaug_pl.preflight.runner import Preflight
from harmaug_pl.preflight.table import format_table, summary

log = logging.getLogger(__name__)


def automatic_check(config: dict[str, Any], command: str) -> None:
    """The quick preflight a Trainer command runs on its parsed configuration, before building anything.

    Prints only warnings and blockers; raises :class:`PreflightError` (exit status 2) on a blocker.
    """
    start = time.perf_counter()
    rows = Preflight(config, command=command, quick=True).run()
    seconds = time.perf_counter() - start
    problems = [row for row in rows if row.status != "ok"]
    log.info("preflight: %s", summary(rows, seconds))
    if problems:
        print(f"preflight before {command}: {summary(rows, seconds)}", file=sys.stderr)
        print(format_table(problems), file=sys.stderr)
    blockers = [row for row in rows if row.status == "blocker"]
    if blockers:
        first = blockers[0]
        raise PreflightError(
            f"{len(blockers)} blocker(s) would stop this {command} (table above; nothing was loaded), first: "
            f"{first.what} of {first.subject}: {first.detail}. Fix them (`harmaug check` with the same "
            "--config and overrides prints the full table) or skip this check with --preflight=false or "
            "HARMAUG_PREFLIGHT=0"
        )

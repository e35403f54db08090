"""The quick preflight that ``augment``, ``fit``, ``validate`` and ``test`` run before building anything."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from harmaug_pl.preflight import CheckRow, PreflightError
from harmaug_pl.preflight.ranks import agreed_error, exchange, launch_rendezvous, verdict
from harmaug_pl.preflight.table import format_table, summary

log = logging.getLogger(__name__)


def automatic_check(config: dict[str, Any], command: str) -> None:
    """The quick preflight a Trainer command runs on its parsed configuration, before building anything.

    Prints only warnings and blockers; raises :class:`PreflightError` (exit status 2) on a blocker,
    on every rank of a torchrun or srun launch when any rank found one (:mod:`~harmaug_pl.preflight.ranks`).
    """
    from harmaug_pl.preflight.runner import Preflight  # the checks' imports; `settle` needs none of them

    start = time.perf_counter()
    try:
        rows = Preflight(config, command=command, quick=True).run()
    except Exception as err:
        where = launch_rendezvous()
        if where is not None:  # the other ranks learn it now, not at a collective 30 minutes later
            exchange(verdict([], failure=f"{type(err).__name__}: {err}"), where)
        raise
    settle(rows, command, time.perf_counter() - start)


def settle(rows: list[CheckRow], command: str, seconds: float) -> None:
    """Print this rank's problems, then stop on a blocker of any rank, every rank with the same error."""
    problems = [row for row in rows if row.status != "ok"]
    log.info("preflight: %s", summary(rows, seconds))
    if problems:
        print(f"preflight before {command}: {summary(rows, seconds)}", file=sys.stderr)
        print(format_table(problems), file=sys.stderr)
    blockers = [row for row in rows if row.status == "blocker"]
    where = launch_rendezvous()
    if where is not None:
        error = agreed_error(exchange(verdict(blockers), where), command)
        if error is not None:
            raise error
        return
    if blockers:
        first = blockers[0]
        raise PreflightError(
            f"{len(blockers)} blocker(s) would stop this {command} (table above; nothing was loaded), first: "
            f"{first.what} of {first.subject}: {first.detail}. Fix them (`harmaug check` with the same "
            "--config and overrides prints the full table) or skip this check with --preflight=false or "
            "HARMAUG_PREFLIGHT=0"
        )

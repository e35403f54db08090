"""``harmaug check``: the preflight table of a pack, and its automatic part before the Trainer commands.

``harmaug check --config <pack> [--config ...] [--key value ...]`` parses the packs as every command
does and prints one row per model, tokenizer, data set, extra, GPU, disk and directory, each with
the fix when it fails; the exit status is 2 when any row is a blocker, else 0. ``augment``, ``fit``,
``validate`` and ``test`` run the quick part first and print only its problems.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from typing import Any

from harmaug_pl.errors import one_line_errors
from harmaug_pl.preflight import PreflightError, Row
from harmaug_pl.preflight.checks import Preflight
from harmaug_pl.preflight.hub import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

OWN_OPTIONS = {"--offline": 0, "--json": 0, "--quick": 0, "--timeout": 1}  # option -> values it takes
SUBJECT_WIDTH = 56
WHAT_WIDTH = 22


def format_table(rows: list[Row]) -> str:
    """Rows as an aligned text table; a failing row's fix goes on the line below its detail."""
    lines = [f"{'status':<8} {'check':<{WHAT_WIDTH}} {'subject':<{SUBJECT_WIDTH}} detail"]
    indent = " " * (10 + WHAT_WIDTH + SUBJECT_WIDTH)
    for row in rows:
        status = row.status.upper() if row.status == "blocker" else row.status
        lines.append(f"{status:<8} {row.what:<{WHAT_WIDTH}} {row.subject:<{SUBJECT_WIDTH}} {row.detail}")
        if row.fix and row.status != "ok":
            lines.append(f"{indent}fix: {row.fix}")
    return "\n".join(lines)


def summary(rows: list[Row], seconds: float) -> str:
    counts = {status: sum(row.status == status for row in rows) for status in ("ok", "warn", "blocker")}
    return (
        f"{len(rows)} rows: {counts['ok']} ok, {counts['warn']} warning(s), {counts['blocker']} "
        f"blocker(s) ({seconds:.1f} s)"
    )


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmaug check",
        description=(
            "Check a pack before a long run, loading no weights (configs, tokenizers and file listings "
            "only): every model resolves (local path, pkg://, the HF cache, or the hub) in a weights format "
            "the loaders accept; generator/responder/teacher tokenizers have a chat template; the teacher's "
            "verdict words are distinct first tokens; the student's max_length fits its position "
            "embeddings; every seed and eval set is there; the extras and CUDA the pack needs are present; "
            "estimated memory per stage fits the visible GPUs (or RAM); the run directories and MLflow "
            "store are writable with enough free disk. Prints one table with the fix for each failing "
            "row. Exit status 2 when any row is a blocker, else 0. Any other --key value is a pack "
            "override, as for fit."
        ),
    )
    parser.add_argument(
        "--config",
        "-c",
        action="append",
        required=True,
        metavar="PACK",
        help="a pack: path or shipped name (repeat to layer packs and callback sets)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="do not contact the hub (as HF_HUB_OFFLINE=1): only local files and caches count",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds per hub request; after one failed request the hub counts as unreachable "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="only what augment/fit check automatically (skips reading GGUF metadata)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def pack_arguments(argv: list[str]) -> list[str]:
    """``argv`` without this command's own options: the packs and overrides, in their order."""
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name, has_value, _ = arg.partition("=")
        if name in OWN_OPTIONS:
            skip = 0 if has_value else OWN_OPTIONS[name]
            continue
        kept.append(arg)
    return kept


def console_main(argv: list[str]) -> None:
    """``harmaug check ...``: exit status 2 on a blocker (or a pack that does not parse), else 0."""
    options, _ = _parser().parse_known_args(argv)
    start = time.perf_counter()
    with one_line_errors("harmaug check"):
        from harmaug_pl.cli import parse_config

        config = parse_config(pack_arguments(argv))
        rows = Preflight(
            config, quick=options.quick, timeout=options.timeout, offline=True if options.offline else None
        ).run()
    seconds = time.perf_counter() - start
    if options.json:
        print(
            json.dumps({"rows": [asdict(row) for row in rows], "summary": summary(rows, seconds)}, indent=1)
        )
    else:
        print(format_table(rows))
        print(f"harmaug check: {summary(rows, seconds)}")
    sys.exit(2 if any(row.status == "blocker" for row in rows) else 0)

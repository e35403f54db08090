"""``harmaug check``: the preflight table of a pack, parsed through the Trainer verbs' own parser.

``harmaug check --config <pack> [--config ...] [--key value ...]`` parses the packs as every command
does and prints one row per model, tokenizer, data set, extra, GPU, disk and directory, each with
the fix when it fails; the exit status is 2 when any row is a blocker, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from harmaug_pl.errors import one_line_errors
from harmaug_pl.preflight import DEFAULT_TIMEOUT_S
from harmaug_pl.preflight.table import format_table, summary


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
    """``argv`` without this command's own options (read off its parser): the packs and overrides,
    in their order (a pack and an override layer in the order given, so they are not regrouped)."""
    own = {
        option: 0 if action.nargs == 0 else 1
        for action in _parser()._actions
        for option in action.option_strings
        if action.dest not in ("config", "help")
    }
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name, has_value, _ = arg.partition("=")
        if name in own:
            skip = 0 if has_value else own[name]
            continue
        kept.append(arg)
    return kept


def console_main(argv: list[str]) -> None:
    """``harmaug check ...``: exit status 2 on a blocker (or a pack that does not parse), else 0."""
    options, _ = _parser().parse_known_args(argv)
    start = time.perf_counter()
    with one_line_errors("harmaug check"):
        from harmaug_pl.cli.lightning_cli import parse_config  # LightningCLI: only once a pack is given
        from harmaug_pl.preflight.runner import Preflight

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

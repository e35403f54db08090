"""``harmaug`` / ``lightning`` / ``python -m harmaug_pl``: the one table of verbs and their parsers.

The Trainer verbs (``fit``, ``validate``, ``test``, ``predict``, ``augment``) go to the LightningCLI
in :mod:`harmaug_pl.cli.lightning_cli`. Every other verb has its own argparse parser in the module
named below, imported only when that verb runs: ``harmaug serve --help`` loads neither torch nor
Lightning. Nothing below this package imports it.
"""

from __future__ import annotations

import importlib
import sys

from harmaug_pl.errors import one_line_errors

# verb -> the module whose ``console_main(argv)`` runs it (and whose parser answers ``--help``)
VERBS = {
    "check": "harmaug_pl.cli.check",
    "ablation": "harmaug_pl.cli.ablation",
    "export": "harmaug_pl.deploy.export",
    "classify": "harmaug_pl.deploy.classify",
    "serve": "harmaug_pl.deploy.serve",
}


def run_verb(argv: list[str]) -> bool:
    """Run ``argv[0]`` if it is one of :data:`VERBS`; False for the Trainer verbs."""
    if not argv or argv[0] not in VERBS:
        return False
    with one_line_errors(f"harmaug {argv[0]}"):  # a missing optional extra is one line too
        command = importlib.import_module(VERBS[argv[0]])
    command.console_main(argv[1:])
    return True


def console_main() -> None:
    """The ``harmaug`` and ``lightning`` console scripts.

    They call ``sys.exit(<this>())``: returning the CLI object (as
    :func:`harmaug_pl.cli.lightning_cli.main` does for tests and notebooks) would print it and exit
    with status 1 after a successful run.
    """
    if not run_verb(sys.argv[1:]):
        from harmaug_pl.cli.lightning_cli import main

        main()

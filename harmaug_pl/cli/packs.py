"""Packs and callback sets shipped in the wheel, found by bare name (``--config cpu_tiny``).

Imports nothing heavy: ``harmaug check --help`` and the light verbs use it before torch loads.
"""

from __future__ import annotations

import os

from harmaug_pl.errors import ConfigError
from harmaug_pl.package_refs import PACKAGE_ROOT

SHIPPED_CONFIG_DIRS = (PACKAGE_ROOT / "packs", PACKAGE_ROOT / "callback_sets")


def shipped_config(name: str) -> str | None:
    """Path of a pack or callback set shipped in the package, by bare name (``cpu_tiny``)."""
    stem = name[:-5] if name.endswith(".yaml") else name
    for folder in SHIPPED_CONFIG_DIRS:
        candidate = folder / f"{stem}.yaml"
        if candidate.is_file():
            return str(candidate)
    return None


def resolve_pack_args(args: list[str]) -> list[str]:
    """Replace ``--config NAME`` by the shipped file when NAME is not a path that exists."""
    resolved = list(args)
    for i, arg in enumerate(resolved):
        value, prefix = None, ""
        if arg in ("--config", "-c") and i + 1 < len(resolved):
            value, target = resolved[i + 1], i + 1
        elif arg.startswith("--config="):
            value, target, prefix = arg.split("=", 1)[1], i, "--config="
        if value is None or os.path.exists(value) or "/" in value:
            continue
        shipped = shipped_config(value)
        if shipped is None:
            raise ConfigError(
                f"--config {value}: no such file, and no shipped pack or callback set of that name "
                f"(shipped: {', '.join(shipped_names())})"
            )
        resolved[target] = prefix + shipped
    return resolved


def shipped_names() -> list[str]:
    """Bare names of the packs and callback sets shipped in the package."""
    return sorted(path.stem for folder in SHIPPED_CONFIG_DIRS for path in folder.glob("*.yaml"))

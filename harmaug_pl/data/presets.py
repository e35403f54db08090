"""Named evaluation sets shipped as YAML in ``harmaug_pl/eval_sets/``: where the data is, how it maps.

A preset holds the :class:`~harmaug_pl.data.loaders.DataSource` settings of one public benchmark
(``source``) and what the report needs to know about it (``paper_column``: its column in the
paper's Table 1; ``role``: ``benchmark`` or ``over_refusal``). Packs name a preset with
``preset: <name>`` on a data source and override any setting, e.g. ``path:`` to a local copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import yaml

from harmaug_pl.errors import ConfigError
from harmaug_pl.package_refs import PACKAGE_ROOT

PRESET_DIR = PACKAGE_ROOT / "eval_sets"
ROLES = ("benchmark", "over_refusal")


@dataclass(frozen=True)
class EvalSetPreset:
    """One shipped eval set: its data-source defaults and its place in the report."""

    name: str
    description: str
    source: dict[str, Any] = field(default_factory=dict)
    paper_column: str | None = None
    role: Literal["benchmark", "over_refusal"] = "benchmark"


def shipped_presets() -> list[str]:
    """Names of the eval-set presets shipped in the package."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


@cache
def load_preset(name: str) -> EvalSetPreset:
    """The preset called ``name``; :class:`ConfigError` listing the shipped ones when there is none."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"preset: {name!r} is not a shipped eval set; shipped presets: {', '.join(shipped_presets())}"
        )
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    preset = EvalSetPreset(name=name, **document)
    if preset.role not in ROLES:
        raise ConfigError(f"{path}: role must be one of {ROLES}, got {preset.role!r}")
    return preset

"""Harm categories: the pack's taxonomy, per-row targets, the student's category head and its files.

A guard with categories still answers safe/unsafe with its binary head; beside it, a *category
head* (one linear layer, per-category sigmoid) reads the same features the binary classifier reads,
on the same forward pass, and gives P(category) per row: the probability that the row is unsafe *and*
of that kind. Categories are not exclusive (a row can be hate and violence), hence sigmoids, not a
softmax.

Targets per row and category, from the best source present:

* the teacher's distribution over its codes (Llama-Guard: read after ``"unsafe\\nS"``):
  ``P(unsafe) * P(code | unsafe)``, a soft target;
* else the data set's human label for the category's OpenAI name (0/1; absent = unknown);
* else none: the category is masked out of the loss for that row.

The guard folder keeps ``config.json``/``model.safetensors`` a plain 2-label classifier; the head and
the taxonomy travel in :data:`CATEGORY_WEIGHTS` and :data:`CATEGORY_CONFIG`, which only harmaug reads.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from harmaug_pl.errors import ConfigError, DataError, ModelLoadError
from harmaug_pl.package_refs import PACKAGE_ROOT

TAXONOMY_DIR = PACKAGE_ROOT / "taxonomies"
CATEGORY_CONFIG = "harmaug_categories.json"
CATEGORY_WEIGHTS = "harmaug_categories.safetensors"
# OpenAI's moderation category names (``openai.types.moderation.Categories``, by their JSON aliases)
OPENAI_CATEGORIES = frozenset(
    {
        "harassment",
        "harassment/threatening",
        "hate",
        "hate/threatening",
        "illicit",
        "illicit/violent",
        "self-harm",
        "self-harm/intent",
        "self-harm/instructions",
        "sexual",
        "sexual/minors",
        "violence",
        "violence/graphic",
    }
)
# the modules whose input is the pooled features the binary head reads, by architecture family
CLASSIFIER_MODULES = ("classifier", "score")


class Category(TypedDict, total=False):
    """One category of a pack's taxonomy (plain YAML values, so checkpoints stay weights-only)."""

    name: str
    description: str
    openai: str | None  # OpenAI's moderation name, only where the mapping is honest
    code: str | None  # the teacher's code for it (Llama-Guard-3: "S1" ... "S14")


def shipped_taxonomies() -> list[str]:
    return sorted(path.stem for path in TAXONOMY_DIR.glob("*.yaml"))


def check_taxonomy(categories: Sequence[dict[str, Any]] | str, where: str) -> list[Category]:
    """The pack's taxonomy (a list, or the name of one shipped in ``harmaug_pl/taxonomies``), checked:
    unique names, known OpenAI names, each answering for one category, unique codes."""
    if isinstance(categories, str):
        path = TAXONOMY_DIR / f"{categories}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"{where}: no shipped taxonomy {categories!r} (shipped: {', '.join(shipped_taxonomies())}); "
                "give a list of {name, description, openai, code} instead"
            )
        return check_taxonomy(yaml.safe_load(path.read_text()) or [], f"{where} ({path.name})")
    allowed = set(Category.__annotations__)
    seen_names: set[str] = set()
    seen_codes: set[str] = set()
    seen_public: dict[str, str] = {}
    checked: list[Category] = []
    for i, entry in enumerate(categories):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{at}: a category is a mapping with name/description/openai/code, got {entry!r}"
            )
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ConfigError(f"{at}: unknown keys {unknown} (allowed: {sorted(allowed)})")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{at}.name: a non-empty string is required, got {name!r}")
        if name in seen_names:
            raise ConfigError(f"{at}.name: {name!r} is given twice")
        openai = entry.get("openai")
        if openai is not None and openai not in OPENAI_CATEGORIES:
            raise ConfigError(
                f"{at}.openai: {openai!r} is not an OpenAI moderation category "
                f"(known: {sorted(OPENAI_CATEGORIES)}); use null where none maps honestly"
            )
        public = openai or name
        if public == "unsafe" or public in seen_public:
            raise ConfigError(
                f"{at}: answers as {public!r} in /v1/moderations, which "
                + (
                    "is the binary head's"
                    if public == "unsafe"
                    else f"{seen_public[public]!r} answers as already"
                )
            )
        code = entry.get("code")
        if code is not None and (not isinstance(code, str) or code in seen_codes):
            raise ConfigError(f"{at}.code: {code!r} must be a string given once")
        seen_names.add(name)
        seen_public[public] = name
        if code is not None:
            seen_codes.add(code)
        checked.append(
            Category(name=name, description=str(entry.get("description", "")), openai=openai, code=code)
        )
    if not checked:
        raise ConfigError(f"{where}: the taxonomy is empty")
    return checked


def metric_name(category: str) -> str:
    """A category name usable as one metric-key segment ('sexual/minors' -> 'sexual_minors')."""
    return category.replace("/", "_")


# -- targets ------------------------------------------------------------------------------------
def row_targets(
    categories: Sequence[Category],
    teacher_score: float | None,
    teacher_categories: dict[str, float] | None,
    human: dict[str, int] | None,
) -> tuple[list[float], list[bool]]:
    """One row's target and mask per category (see the module docstring for the order of sources)."""
    targets, known = [], []
    for category in categories:
        code, openai = category.get("code"), category.get("openai")
        if teacher_categories and code in teacher_categories and teacher_score is not None:
            targets.append(float(teacher_score) * float(teacher_categories[code]))
            known.append(True)
        elif human and openai in human:
            targets.append(float(human[openai]))
            known.append(True)
        else:
            targets.append(0.0)
            known.append(False)
    return targets, known


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per (row, category), averaged over the known ones (0 when none is known)."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    weights = mask.float()
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


# -- the head -----------------------------------------------------------------------------------
def classifier_module(model: Any) -> torch.nn.Module:
    """The student's binary classifier layer, whose input the category head shares."""
    for name in CLASSIFIER_MODULES:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ConfigError(
        f"{type(model).__name__} has none of the classifier layers {list(CLASSIFIER_MODULES)}: the category "
        "head reads that layer's input; use a BERT/DeBERTa/RoBERTa-style student or set category_weight: 0"
    )


class CategoryHead(torch.nn.Module):
    """A linear layer on the features the binary classifier reads, captured by a forward pre-hook.

    The hook keeps the student a plain Hugging Face model (its forward, its saved files unchanged)
    and costs no second encoder pass. Models whose classifier reads the token sequence (RoBERTa's head)
    give the first token's features, as that head does.
    """

    def __init__(self, hidden_size: int, num_categories: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, num_categories)
        self._features: torch.Tensor | None = None
        self._hooked: dict[int, torch.utils.hooks.RemovableHandle] = {}

    def attach(self, model: Any) -> None:
        """Read the features of ``model``'s classifier from now on (once per model)."""
        layer = classifier_module(model)
        if id(layer) in self._hooked:
            return

        def keep(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            self._features = inputs[0]

        self._hooked[id(layer)] = layer.register_forward_pre_hook(keep)

    def forward(self) -> torch.Tensor:
        """Category logits for the features of the model's latest forward pass."""
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("CategoryHead called before its model ran a forward pass")
        if features.dim() == 3:
            features = features[:, 0]
        return self.linear(features)


def hidden_size(model: Any) -> int:
    """Width of the features the classifier reads (``in_features`` of a linear classifier)."""
    layer = classifier_module(model)
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__}.{type(layer).__name__}: no linear layer to size the head")
    return linears[0].in_features


# -- files --------------------------------------------------------------------------------------
@dataclass
class GuardCategories:
    """What a guard folder carries beside the binary classifier: the head, taxonomy and thresholds."""

    head: CategoryHead
    categories: list[Category]
    thresholds: list[float]

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def save(self, folder: str | Path) -> None:
        """The head's weights (safetensors) and the taxonomy with each category's threshold (JSON)."""
        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(folder / CATEGORY_WEIGHTS))
        entries = [
            {**c, "threshold": float(t)} for c, t in zip(self.categories, self.thresholds, strict=True)
        ]
        (folder / CATEGORY_CONFIG).write_text(json.dumps({"categories": entries}, indent=2) + "\n")

    @staticmethod
    def remove(folder: str | Path) -> None:
        """Drop category files an earlier export left in ``folder`` (a guard without categories)."""
        for name in (CATEGORY_CONFIG, CATEGORY_WEIGHTS):
            (Path(folder) / name).unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: str | Path) -> GuardCategories | None:
        """The folder's categories; ``None`` for a folder without them (exported before, or weight 0)."""
        folder = Path(folder)
        config, weights = folder / CATEGORY_CONFIG, folder / CATEGORY_WEIGHTS
        if not config.is_file() and not weights.is_file():
            return None
        if not (config.is_file() and weights.is_file()):
            missing = weights if config.is_file() else config
            raise ModelLoadError(
                f"{folder}: {missing.name} is missing (the two category files travel together)"
            )
        try:
            entries = json.loads(config.read_text())["categories"]
            thresholds = [float(e.pop("threshold")) for e in entries]
            categories = check_taxonomy(entries, str(config))
            state = load_file(str(weights))
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as err:
            raise ModelLoadError(f"{config}: invalid category files: {err}") from err
        weight = state.get("linear.weight")
        if weight is None or weight.shape[0] != len(categories):
            raise ModelLoadError(
                f"{weights}: the head does not match the {len(categories)} categories of {config.name}"
            )
        head = CategoryHead(weight.shape[1], weight.shape[0])
        head.load_state_dict(state)
        return cls(head.eval(), categories, thresholds)


# -- human labels -------------------------------------------------------------------------------
def read_category_labels(
    path: Path, display: str, fields: dict[str, str], prompt_field: str = "prompt"
) -> dict[str, dict[str, int]]:
    """Per prompt, the known category labels of a JSONL (optionally gzipped) file, keyed by OpenAI name.

    ``fields`` maps an OpenAI category name to the file's column; an absent column is *unknown*.
    Prompts given twice merge (a 1 in any copy wins, so a positive is never lost).
    """
    unknown = sorted(set(fields) - OPENAI_CATEGORIES)
    if unknown:
        raise ConfigError(f"{display}: category_labels.fields keys {unknown} are not OpenAI category names")
    opener = gzip.open if path.suffix == ".gz" else open
    labels: dict[str, dict[str, int]] = {}
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{display} line {number}: invalid JSON: {err.msg}") from err
            prompt = row.get(prompt_field) if isinstance(row, dict) else None
            if not isinstance(prompt, str):
                raise DataError(f"{display} line {number}: field {prompt_field!r} must be a string")
            known = labels.setdefault(prompt, {})
            for name, column in fields.items():
                if column not in row:
                    continue
                value = row[column]
                if value not in (0, 1):
                    raise DataError(
                        f"{display} line {number}: field {column!r} must be 0 or 1, got {value!r}"
                    )
                known[name] = max(known.get(name, 0), int(value))
    return labels

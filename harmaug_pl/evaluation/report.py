"""One evaluation report: student and teacher measured on the same rows, beside the paper's numbers.

Two tables. The summary has the paper's Table 1 layout (F1 per benchmark, mean F1 and mean AUPRC
over the paper's sets, plus XSTest over-refusal); its measured rows come from this run and its
published rows are copied from the paper and say so. The detail table has every metric for every
set, scorer and threshold. Both render as markdown and CSV; :meth:`EvalReport.metrics` gives the
numbers as flat MLflow metric names. With ``perturbed`` (``report.perturbations``), a third table:
the student's AUPRC on each set with its texts rewritten (:mod:`harmaug_pl.evaluation.perturbation`),
beside the clean number.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np

from harmaug_pl.data.presets import EvalSetPreset
from harmaug_pl.evaluation.metrics import ScoredSet, SetMetrics, set_metrics
from harmaug_pl.evaluation.perturbation import PERTURBATIONS

PAPER_COLUMNS = ("OAI", "ToxicChat", "HarmBench", "WildGuardMix")
# HarmAug (arXiv 2410.01524) Table 1, F1 per set, mean F1, mean AUPRC (None: not published).
PUBLISHED: dict[str, tuple[float, float, float, float, float, float | None]] = {
    "Llama-Guard-3 8B (teacher)": (0.8061, 0.4859, 0.8551, 0.6852, 0.7080, 0.7720),
    "WildGuard 7B": (0.7268, 0.6547, 0.8596, 0.7504, 0.7479, None),
    "Llama-Guard-2 8B": (0.8139, 0.4233, 0.8610, 0.6870, 0.6963, None),
    "DeBERTa-v3-large + HarmAug 435M": (0.7236, 0.6283, 0.8331, 0.7576, 0.7357, 0.8362),
}
PUBLISHED_TAG = "published (not measured)"


@dataclass(frozen=True)
class ReportRow:
    """One scorer on one set at one threshold."""

    set_name: str
    scorer: str  # "student", "student_calibrated" or "teacher"
    metrics: SetMetrics


@dataclass(frozen=True)
class CategoryRow:
    """The student on one category of one set (human labels), at that category's threshold."""

    set_name: str
    scorer: str  # "student" or "teacher" (Llama-Guard teachers: P(unsafe) x P(code | unsafe))
    category: str
    openai: str | None
    threshold_source: str  # "val" (calibrated), "fallback" (the val split could not decide) or "pack"
    metrics: SetMetrics  # its ``threshold`` is the one used


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class EvalReport:
    """Every measured row, the set roles needed to summarise them, and rows left out per set."""

    rows: list[ReportRow]
    presets: dict[str, EvalSetPreset | None]
    unlabelled: dict[str, int]
    threshold: float
    calibrated_threshold: float | None
    skipped: dict[str, str] = field(default_factory=dict)  # eval sets left out: name -> why
    categories: list[CategoryRow] = field(default_factory=list)  # per category, sets with their labels
    perturbed: dict[str, dict[str, float | None]] = field(
        default_factory=dict
    )  # set -> perturbation -> AUPRC

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        outputs: dict[str, ScoredSet],
        presets: dict[str, EvalSetPreset | None],
        threshold: float,
        calibrated_threshold: float | None = None,
        unlabelled: dict[str, int] | None = None,
        ece_bins: int = 10,
        skipped: dict[str, str] | None = None,
        categories: list[CategoryRow] | None = None,
        perturbed: dict[str, dict[str, float | None]] | None = None,
    ) -> EvalReport:
        """Score the student at both thresholds and the teacher at ``threshold`` on every set."""
        rows = []
        for name, scored in outputs.items():
            scorers = [("student", scored.student, threshold)]
            if calibrated_threshold is not None:
                scorers.append(("student_calibrated", scored.student, calibrated_threshold))
            if scored.teacher is not None:
                scorers.append(("teacher", scored.teacher, threshold))
            for scorer, scores, at in scorers:
                rows.append(ReportRow(name, scorer, set_metrics(scored.target, scores, at, ece_bins)))
        return cls(
            rows,
            dict(presets),
            dict(unlabelled or {}),
            threshold,
            calibrated_threshold,
            dict(skipped or {}),
            list(categories or []),
            dict(perturbed or {}),
        )

    def scorers(self) -> list[str]:
        return list(dict.fromkeys(row.scorer for row in self.rows))

    def _get(self, set_name: str, scorer: str) -> SetMetrics | None:
        return next((r.metrics for r in self.rows if r.set_name == set_name and r.scorer == scorer), None)

    def _sets_with(self, role: str, column: str | None = None) -> list[str]:
        names = []
        for name in dict.fromkeys(row.set_name for row in self.rows):
            preset = self.presets.get(name)
            if preset is None or preset.role != role:
                continue
            if column is None or preset.paper_column == column:
                names.append(name)
        return names

    def paper_sets(self) -> dict[str, str]:
        """Paper column -> this run's set measuring it (first one wins if several do)."""
        found = {}
        for column in PAPER_COLUMNS:
            names = self._sets_with("benchmark", column)
            if names:
                found[column] = names[0]
        return found

    def mean(self, scorer: str, metric: str) -> float | None:
        """Unweighted mean of ``metric`` over the paper's sets in this run; None if any is undefined."""
        values = [getattr(self._get(name, scorer), metric, None) for name in self.paper_sets().values()]
        if not values or any(v is None for v in values):
            return None
        return float(np.mean(values))

    # -- rendering ----------------------------------------------------------------------------
    def _label(self, scorer: str) -> str:
        if scorer == "student_calibrated":
            return f"student @ calibrated {self.calibrated_threshold:.4f} (measured)"
        return f"{scorer} @ {self.threshold:g} (measured)"

    def summary(self) -> tuple[list[str], list[list[str]]]:
        """Paper-style table: measured rows of this run, then the paper's published rows."""
        paper = self.paper_sets()
        over_refusal = self._sets_with("over_refusal")
        k = len(paper)
        header = ["model", *paper, f"mean F1 ({k} of 4)", f"mean AUPRC ({k} of 4)"]
        header += [f"{name} over-refusal FPR (safe part)" for name in over_refusal]
        rows = []
        for scorer in self.scorers():
            cells = [self._label(scorer)]
            cells += [_fmt(getattr(self._get(name, scorer), "f1", None)) for name in paper.values()]
            cells += [_fmt(self.mean(scorer, "f1")), _fmt(self.mean(scorer, "auprc"))]
            cells += [_fmt(getattr(self._get(name, scorer), "fpr", None)) for name in over_refusal]
            rows.append(cells)
        for model, values in PUBLISHED.items():
            by_column = dict(zip(PAPER_COLUMNS, values[:4]))
            cells = [f"{model}: {PUBLISHED_TAG}", *(_fmt(by_column[c]) for c in paper)]
            cells += [_fmt(values[4]), _fmt(values[5])] + ["n/a"] * len(over_refusal)
            rows.append(cells)
        return header, rows

    DETAIL_COLUMNS = ("n", "n_unsafe", "threshold", "f1", "precision", "recall", "auprc", "fpr", "ece")

    def detail(self) -> tuple[list[str], list[list[str]]]:
        """Every metric of every measured row (all measured in this run)."""
        header = ["set", "scorer", "unlabelled left out", *self.DETAIL_COLUMNS]
        rows = []
        for row in self.rows:
            values = row.metrics.as_dict()
            cells = [row.set_name, row.scorer, str(self.unlabelled.get(row.set_name, 0))]
            rows.append(cells + [_fmt(values[c]) for c in self.DETAIL_COLUMNS])
        return header, rows

    def to_markdown(self) -> str:
        summary, detail = self.summary(), self.detail()
        notes = (
            f"F1/precision/recall/FPR at P(unsafe) > threshold; AUPRC = average precision; ECE over "
            f"equal-width bins. Measured rows score the student and the teacher on the same rows in this "
            f"run; '{PUBLISHED_TAG}' rows are copied from the HarmAug paper (Table 1) on the full sets. "
            "n/a: undefined on this data (e.g. AUPRC of a set without unsafe rows) or not published."
        )
        if self.skipped:
            notes += (
                "\n\nNot measured (unreachable, skipped by data.unavailable_eval_sets: skip): "
                + "; ".join(f"{name}: {reason}" for name, reason in self.skipped.items())
            )
        text = (
            f"## Evaluation summary\n\n{_markdown(*summary)}\n\n"
            f"## Per set\n\n{_markdown(*detail)}\n\n{notes}\n"
        )
        if self.perturbed:
            text += f"\n## Under perturbation (student AUPRC)\n\n{_markdown(*self.perturbation_table())}\n\n"
            text += (
                "Every prompt and response of the set's labelled rows rewritten the same way, scored by "
                "the same student (its tokenizer as exported, normaliser included when the pack sets "
                "data.normalise_text); in brackets the change from clean.\n"
            )
        if self.categories:
            text += f"\n## Per category (human category labels)\n\n{_markdown(*self.category_table())}\n\n"
            text += (
                "positives/known: rows labelled 1 / rows whose label for the category is known (the rest are "
                "not scored for it). Threshold: calibrated on the val split's known labels, or the pack's "
                "threshold (fallback) where the val split has no positives or no negatives for it; the "
                "teacher (P(unsafe) x P(code | unsafe), Llama-Guard teachers) at the pack's threshold "
                "(pack).\n"
            )
        return text

    def category_table(self) -> tuple[list[str], list[list[str]]]:
        """One row per set and category: positives beside every figure."""
        header = [
            "set",
            "scorer",
            "category",
            "OpenAI name",
            "positives",
            "known",
            "threshold",
            "AUPRC",
            "F1",
            "precision",
            "recall",
        ]
        rows = [
            [
                row.set_name,
                row.scorer,
                row.category,
                row.openai or "none",
                str(row.metrics.n_unsafe),
                str(row.metrics.n),
                f"{row.metrics.threshold:.3f} ({row.threshold_source})",
                *(_fmt(getattr(row.metrics, m)) for m in ("auprc", "f1", "precision", "recall")),
            ]
            for row in self.categories
        ]
        return header, rows

    def perturbation_table(self) -> tuple[list[str], list[list[str]]]:
        """One row per set: clean AUPRC, then each perturbation's with its change from clean."""
        names = list(dict.fromkeys(name for by_name in self.perturbed.values() for name in by_name))
        header = ["set", "n", "clean", *(PERTURBATIONS[name].label for name in names)]
        rows = []
        for set_name, by_name in self.perturbed.items():
            clean = self._get(set_name, "student")
            clean_auprc = clean.auprc if clean else None
            cells = [set_name, _fmt(clean.n if clean else None), _fmt(clean_auprc)]
            for name in names:
                value = by_name.get(name)
                change = "" if value is None or clean_auprc is None else f" ({value - clean_auprc:+.4f})"
                cells.append(_fmt(value) + change)
            rows.append(cells)
        return header, rows

    def to_csv(self) -> str:
        """The detail table, one row per set, scorer and threshold (empty cell: undefined)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["set", "scorer", "unlabelled_left_out", *self.DETAIL_COLUMNS])
        for row in self.rows:
            values = row.metrics.as_dict()
            writer.writerow(
                [row.set_name, row.scorer, self.unlabelled.get(row.set_name, 0)]
                + ["" if values[c] is None else values[c] for c in self.DETAIL_COLUMNS]
            )
        return buffer.getvalue()

    def metrics(self) -> dict[str, float]:
        """``report/<set>/<scorer>/<metric>``, ``report/mean/<scorer>/{f1,auprc}``,
        ``report/<set>/student_perturbed/<perturbation>/auprc``; undefined: left out."""
        flat: dict[str, float] = {}
        for row in self.rows:
            for key, value in row.metrics.as_dict().items():
                if value is not None and key not in ("n", "n_unsafe"):
                    flat[f"report/{row.set_name}/{row.scorer}/{key}"] = float(value)
        for scorer in self.scorers():
            for metric in ("f1", "auprc"):
                value = self.mean(scorer, metric)
                if value is not None:
                    flat[f"report/mean/{scorer}/{metric}"] = value
        for set_name, by_name in self.perturbed.items():
            for name, value in by_name.items():
                if value is not None:
                    flat[f"report/{set_name}/student_perturbed/{name}/auprc"] = float(value)
        return flat

"""Per-set guard metrics on P(unsafe) scores: F1/P/R/FPR at a threshold, AUPRC, ECE, threshold calibration.

Everything works on plain numpy arrays so that the student and the teacher are scored by the same
code. A row is predicted unsafe when ``score > threshold``: the rule the teacher's hard label uses
(RECIPE section 1.4). A metric that is undefined on the data (AUPRC or recall without unsafe rows,
FPR without safe rows, precision without predicted-unsafe rows) is ``None``, never a crash or a
silent 0, so a one-class set reads "n/a" in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torchmetrics.functional.classification import binary_average_precision

from harmaug_pl.errors import ConfigError

Calibration = Literal["none", "max_f1", "target_fpr"]


@dataclass
class ScoredSet:
    """One eval set's labelled rows: human label, the student's and (when known) the teacher's P(unsafe).

    With a category head: the student's P(category) and the human category labels (-1: unknown),
    ``[rows, categories]`` each.
    """

    target: np.ndarray
    student: np.ndarray
    teacher: np.ndarray | None = None
    category_student: np.ndarray | None = None
    category_target: np.ndarray | None = None
    category_teacher: np.ndarray | None = None  # the teacher's P(unsafe) x P(code | unsafe); NaN: none

    def __post_init__(self) -> None:
        self.target = np.asarray(self.target, dtype=np.int64)
        self.student = np.asarray(self.student, dtype=np.float64)
        if self.teacher is not None:
            self.teacher = np.asarray(self.teacher, dtype=np.float64)
            if np.isnan(self.teacher).any():  # some rows were never teacher-scored: no teacher row
                self.teacher = None


@dataclass(frozen=True)
class SetMetrics:
    """What the report shows for one scorer on one set at one threshold (``None`` = undefined)."""

    n: int
    n_unsafe: int
    threshold: float
    f1: float | None
    precision: float | None
    recall: float | None
    fpr: float | None
    auprc: float | None
    ece: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "n": self.n,
            "n_unsafe": self.n_unsafe,
            "threshold": self.threshold,
            "f1": self.f1,
            "precision": self.precision,
            "recall": self.recall,
            "fpr": self.fpr,
            "auprc": self.auprc,
            "ece": self.ece,
        }


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def auprc(target: np.ndarray, scores: np.ndarray) -> float | None:
    """Average precision (= sklearn ``average_precision_score``, the module's torchmetrics metric)."""
    if not target.any():
        return None
    value = binary_average_precision(torch.from_numpy(scores), torch.from_numpy(target), thresholds=None)
    return float(value)


def expected_calibration_error(target: np.ndarray, scores: np.ndarray, n_bins: int = 10) -> float | None:
    """ECE of P(unsafe) against the label: sum over equal-width bins of |B|/n * |rate(B) - mean p(B)|.

    Bins are ``[k/n_bins, (k+1)/n_bins)`` with 1.0 in the last bin.
    """
    if n_bins < 1:
        raise ConfigError(f"ece_bins must be >= 1, got {n_bins}")
    if target.size == 0:
        return None
    bins = np.minimum((scores * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        members = bins == b
        total += members.sum() * abs(target[members].mean() - scores[members].mean())
    return float(total / target.size)


def set_metrics(target: np.ndarray, scores: np.ndarray, threshold: float, ece_bins: int = 10) -> SetMetrics:
    """All report metrics for one scorer on one set at ``threshold``."""
    predicted = scores > threshold
    positive = target == 1
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    n_neg = int((~positive).sum())
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    # F1 = 2TP / (2TP + FP + FN): defined (0) when there are predictions or positives but no hits
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return SetMetrics(
        n=int(target.size),
        n_unsafe=int(positive.sum()),
        threshold=float(threshold),
        f1=f1,
        precision=precision,
        recall=recall,
        fpr=_ratio(fp, n_neg),
        auprc=auprc(target, scores),
        ece=expected_calibration_error(target, scores, ece_bins),
    )


def calibrate_threshold(
    target: np.ndarray, scores: np.ndarray, method: Calibration, target_fpr: float = 0.05
) -> float | None:
    """The threshold that maximises F1 (``max_f1``) or the lowest one whose FPR <= ``target_fpr``.

    Candidates are midpoints between consecutive distinct scores, so ``score > threshold`` splits the
    rows exactly where the ranking does. ``None`` when the data cannot decide (one class, or all
    scores equal), and for ``method="none"``.
    """
    if method == "none":
        return None
    if method not in ("max_f1", "target_fpr"):
        raise ConfigError(f"threshold calibration must be none, max_f1 or target_fpr, got {method!r}")
    if not 0.0 <= target_fpr <= 1.0:
        raise ConfigError(f"target_fpr must be in [0, 1], got {target_fpr}")
    distinct = np.unique(scores)
    if distinct.size < 2 or not target.any() or target.all():
        return None
    candidates = (distinct[:-1] + distinct[1:]) / 2.0
    pos_sorted = np.sort(scores[target == 1])
    neg_sorted = np.sort(scores[target == 0])
    tp = pos_sorted.size - np.searchsorted(pos_sorted, candidates, side="right")  # positives > t
    fp = neg_sorted.size - np.searchsorted(neg_sorted, candidates, side="right")
    if method == "max_f1":
        fn = pos_sorted.size - tp
        f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        return float(candidates[int(np.argmax(f1))])  # first maximum: the lowest threshold among ties
    ok = np.flatnonzero(fp / neg_sorted.size <= target_fpr)
    return float(candidates[ok[0]]) if ok.size else None

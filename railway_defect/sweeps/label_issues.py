"""Label audit of a cross-validation sweep: the photos whose label the out-of-fold predictions
doubt most (cleanlab's find_label_issues on scores of models that never trained on the photo), in
label_issues.csv beside the summary. A list for a person to re-check, never a relabelling; the
estimate without them is a sensitivity figure only (dropping the photos a model disagrees with
flatters it)."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from railway_defect.utils.outputs import write_text_atomic

log = logging.getLogger(__name__)

LABEL_ISSUES_FILE = "label_issues.csv"
# cleanlab estimates per-class noise rates: fewer scored photos of a class than this say nothing
MIN_PER_CLASS = 5


@dataclass
class LabelAudit:
    """The flagged photos, ranked (most doubtful first), and the estimate with and without them."""

    source: str
    positive_class: str
    scored: int
    flagged: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    # the classes in probability-column order; a binary audit lists p of the positive class only
    classes: list[str] = field(default_factory=list)


def audit(
    source: str,
    paths: list[str],
    labels: list[str],
    scores: np.ndarray,
    thresholds: np.ndarray,
    positive_class: str,
) -> LabelAudit | None:
    """Binary: the label issues of photos scored `scores` (p of `positive_class`), each decided at
    its own threshold; None, with one warning line, when the audit cannot run."""
    negative = next((label for label in labels if label != positive_class), f"not {positive_class}")
    probs = np.column_stack([1.0 - scores, scores])
    predicted = (scores >= thresholds).astype(int)
    return audit_classes(source, paths, labels, probs, [negative, positive_class], predicted, positive_class)


def audit_classes(
    source: str,
    paths: list[str],
    labels: list[str],
    probs: np.ndarray,
    classes: list[str],
    predicted: np.ndarray,
    positive_class: str,
) -> LabelAudit | None:
    """Rank the label issues of photos with out-of-fold `probs` (one column per class of
    `classes`) and the rule's `predicted` class indices; None, with one warning line, when
    cleanlab is missing or a class has too few photos."""
    given = np.array([classes.index(label) for label in labels])
    if not _enough_per_class(given, len(classes)):
        return None
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        log.warning("Label audit skipped: cleanlab is not installed (pip install cleanlab).")
        return None
    probs = probs / probs.sum(axis=1, keepdims=True)  # cleanlab wants rows that sum to 1 exactly
    ranked = find_label_issues(given, probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(given, probs)
    shown = [positive_class] if len(classes) == 2 else classes
    result = LabelAudit(source, positive_class, len(paths), classes=list(classes))
    result.flagged = [
        {
            "rank": rank,
            "path": paths[i],
            "label": labels[i],
            **{f"p_{c}": round(float(probs[i, classes.index(c)]), 6) for c in shown},
            "label_quality": round(float(quality[i]), 6),
        }
        for rank, i in enumerate(ranked, start=1)
    ]
    kept = np.ones(len(paths), dtype=bool)
    kept[list(ranked)] = False
    positive = classes.index(positive_class)
    result.sensitivity = {
        "all photos": _point(given, probs, predicted, positive),
        "without the flagged": _point(given[kept], probs[kept], predicted[kept], positive),
    }
    return result


def _enough_per_class(given: np.ndarray, k: int) -> bool:
    fewest = int(np.bincount(given, minlength=k).min())
    if fewest < MIN_PER_CLASS:
        rarest = "rarer" if k == 2 else "rarest"
        log.warning(
            "Label audit skipped: %d out-of-fold photos of the %s class, cleanlab needs %d.",
            fewest,
            rarest,
            MIN_PER_CLASS,
        )
    return fewest >= MIN_PER_CLASS


def _point(given: np.ndarray, probs: np.ndarray, predicted: np.ndarray, positive: int) -> dict[str, float]:
    """AUROC (K classes: one-vs-rest, macro), balanced accuracy (K classes: macro recall) and the
    positive class's recall; n alone when a class has no photo left."""
    if len(np.unique(given)) < probs.shape[1]:
        return {"n": int(given.size)}
    if probs.shape[1] == 2:
        auroc = roc_auc_score(given == positive, probs[:, positive])
    else:
        auroc = roc_auc_score(given, probs, multi_class="ovr", average="macro")
    return {
        "n": int(given.size),
        "auroc": float(auroc),
        "balanced_accuracy": float(balanced_accuracy_score(given, predicted)),
        "recall": float((predicted[given == positive] == positive).mean()),
    }


def to_csv(result: LabelAudit) -> str:
    buffer = io.StringIO()
    shown = [result.positive_class] if len(result.classes) <= 2 else result.classes
    columns = ["rank", "path", "label", *(f"p_{c}" for c in shown), "label_quality"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.flagged)
    return buffer.getvalue()


def markdown(result: LabelAudit | None) -> list[str]:
    if result is None:
        return []
    lines = [
        "## Label audit (cleanlab)",
        "",
        f"{len(result.flagged)} of {result.scored} photos have a label the {result.source} predictions "
        f"doubt ({LABEL_ISSUES_FILE}, most doubtful first): re-check them; nothing was relabelled. "
        "The metrics without them are a sensitivity figure only, never an estimate.",
        "",
        _header(result),
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in result.sensitivity.items():
        cells = [f"{m[k]:.3f}" if k in m else "n/a" for k in ("auroc", "balanced_accuracy", "recall")]
        lines.append(f"| {name} | {m['n']} | " + " | ".join(cells) + " |")
    return lines


def _header(result: LabelAudit) -> str:
    if len(result.classes) <= 2:
        return "| photos | n | AUROC | balanced accuracy | recall |"
    return f"| photos | n | AUROC (one-vs-rest, macro) | macro recall | {result.positive_class} recall |"


def write(sweep_dir: Path, result: LabelAudit | None) -> list[Path]:
    if result is None:
        return []
    write_text_atomic(sweep_dir / LABEL_ISSUES_FILE, to_csv(result))
    return [sweep_dir / LABEL_ISSUES_FILE]

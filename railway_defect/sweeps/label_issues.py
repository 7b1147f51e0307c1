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


def audit(
    source: str,
    paths: list[str],
    labels: list[str],
    scores: np.ndarray,
    thresholds: np.ndarray,
    positive_class: str,
) -> LabelAudit | None:
    """Rank the label issues of photos scored `scores` (p of `positive_class`) out of fold; None,
    with one warning line, when cleanlab is missing or a class has too few photos."""
    is_pos = np.array([label == positive_class for label in labels])
    fewest = min(int(is_pos.sum()), int((~is_pos).sum()))
    if fewest < MIN_PER_CLASS:
        log.warning(
            "Label audit skipped: %d out-of-fold photos of the rarer class, cleanlab needs %d.",
            fewest,
            MIN_PER_CLASS,
        )
        return None
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        log.warning("Label audit skipped: cleanlab is not installed (pip install cleanlab).")
        return None
    given = is_pos.astype(int)
    probs = np.column_stack([1.0 - scores, scores])
    ranked = find_label_issues(given, probs, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(given, probs)
    result = LabelAudit(source, positive_class, len(paths))
    result.flagged = [
        {
            "rank": rank,
            "path": paths[i],
            "label": labels[i],
            f"p_{positive_class}": round(float(scores[i]), 6),
            "label_quality": round(float(quality[i]), 6),
        }
        for rank, i in enumerate(ranked, start=1)
    ]
    kept = np.ones(len(paths), dtype=bool)
    kept[list(ranked)] = False
    result.sensitivity = {
        "all photos": _point(is_pos, scores, thresholds),
        "without the flagged": _point(is_pos[kept], scores[kept], thresholds[kept]),
    }
    return result


def _point(is_pos: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    if is_pos.all() or not is_pos.any():
        return {"n": int(is_pos.size)}
    predicted = scores >= thresholds
    return {
        "n": int(is_pos.size),
        "auroc": float(roc_auc_score(is_pos, scores)),
        "balanced_accuracy": float(balanced_accuracy_score(is_pos, predicted)),
        "recall": float(predicted[is_pos].mean()),
    }


def to_csv(result: LabelAudit) -> str:
    buffer = io.StringIO()
    columns = ["rank", "path", "label", f"p_{result.positive_class}", "label_quality"]
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
        "| photos | n | AUROC | balanced accuracy | recall |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in result.sensitivity.items():
        cells = [f"{m[k]:.3f}" if k in m else "n/a" for k in ("auroc", "balanced_accuracy", "recall")]
        lines.append(f"| {name} | {m['n']} | " + " | ".join(cells) + " |")
    return lines


def write(sweep_dir: Path, result: LabelAudit | None) -> list[Path]:
    if result is None:
        return []
    write_text_atomic(sweep_dir / LABEL_ISSUES_FILE, to_csv(result))
    return [sweep_dir / LABEL_ISSUES_FILE]

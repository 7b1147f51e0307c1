"""predictions_<split>.csv of evaluate: one row per scored image, to look at the errors or to pool
out-of-fold predictions."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from railway_defect.data.discovery import Sample
from railway_defect.models.contract import ModelContract
from railway_defect.utils.decision import DecisionRule
from railway_defect.utils.outputs import write_text_atomic


def write_predictions(
    path: Path, samples: list[Sample], probs: np.ndarray, rule: DecisionRule, contract: ModelContract
) -> Path:
    """Per-image scores: path, label, p of the positive class (binary) or of every class, and the
    class `rule` predicts."""
    names = contract.class_names
    shown = [contract.positive_index] if len(names) == 2 else list(range(len(names)))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", *(f"p_{names[i]}" for i in shown), "predicted"])
    for sample, p, predicted in zip(samples, probs, rule.labels(probs), strict=True):
        writer.writerow([str(sample.path), sample.label, *(f"{p[i]:.6f}" for i in shown), names[predicted]])
    write_text_atomic(path, buffer.getvalue())
    return path

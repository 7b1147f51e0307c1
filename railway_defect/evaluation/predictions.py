"""predictions_<split>.csv of evaluate: one row per scored image, to look at the errors or to pool
out-of-fold predictions."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from railway_defect.data.discovery import Sample
from railway_defect.utils.metrics import negative_label
from railway_defect.utils.outputs import write_text_atomic


def write_predictions(
    path: Path, samples: list[Sample], p_positive: np.ndarray, threshold: float, info: Any
) -> Path:
    """Per-image scores (path, label, p of the positive class, predicted at the threshold), to look
    at the errors or pool out-of-fold predictions."""
    negative = negative_label(info.class_names, info.positive_class)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", f"p_{info.positive_class}", "predicted"])
    for sample, p in zip(samples, p_positive, strict=True):
        predicted = info.positive_class if p >= threshold else negative
        writer.writerow([str(sample.path), sample.label, f"{p:.6f}", predicted])
    write_text_atomic(path, buffer.getvalue())
    return path

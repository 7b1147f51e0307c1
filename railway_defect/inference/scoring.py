"""The one way a model is scored on labelled photos outside training: decode each file as the
model's contract says (storage form, decode size), preprocess, batch, logits. evaluate (its
splits, the locked Test split, out-of-fold calibration) and the review notebook use it; predict
and serve score unlabelled inputs through the same Predictor methods (decode, preprocess,
probabilities), and validation in training is checked equal to it by the tests."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from railway_defect.data.discovery import Sample
from railway_defect.data.images import decode_files
from railway_defect.data.splits import check_unchanged
from railway_defect.inference.inputs import batched
from railway_defect.inference.model import Predictor
from railway_defect.utils.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ScoredSamples:
    """The readable samples in order, their logits and class indices, and the files skipped."""

    samples: list[Sample]
    logits: np.ndarray
    targets: np.ndarray
    skipped: list[dict[str, str]]
    images: dict[Path, np.ndarray]  # the decoded arrays, to draw or explain a sample

    def probabilities(self) -> np.ndarray:
        """Softmax of the logits (no temperature: the model's own probabilities)."""
        return torch.softmax(torch.from_numpy(self.logits), dim=1).numpy()


def score_samples(
    predictor: Predictor,
    samples: Sequence[Sample],
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    record: tuple[Path, dict[Path, str]] | None = None,
) -> ScoredSamples:
    """Score `samples` with `predictor`; unreadable files are skipped with a warning. With `record`
    (a splits.csv and its digests), a file that changed since training is an error."""
    classes = list(predictor.contract.class_names)
    unknown = sorted({s.label for s in samples} - set(classes))
    if unknown:
        raise UserError(f"Labels {unknown} in the data are not classes of the model ({', '.join(classes)}).")
    contract = predictor.contract
    cache = Path(cache_dir) if cache_dir else None
    decoded = decode_files([s.path for s in samples], contract.decode_size, cache, mode=contract.harmonize)
    if record is not None:
        check_unchanged(record[0], record[1], decoded.digests)
    kept = [s for s in samples if s.path in decoded.images]
    logits = [
        predictor.logits(predictor.preprocess([decoded.images[s.path] for s in chunk]))
        for chunk in batched(kept, batch_size)
    ]
    for path, reason in decoded.failures.items():
        log.warning("Skipping %s: %s", path, reason)
    return ScoredSamples(
        samples=kept,
        logits=np.concatenate(logits) if logits else np.zeros((0, len(classes)), dtype=np.float32),
        targets=np.array([classes.index(s.label) for s in kept], dtype=np.int64),
        skipped=[{"path": str(p), "reason": r} for p, r in decoded.failures.items()],
        images=decoded.images,
    )

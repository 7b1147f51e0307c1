"""The locked Test split (data.test_fraction) of a final model trained on every other labelled
photo: scored at the threshold the model carries (its recipe's, or one chosen out of fold), with
nothing fitted on these photos, so the metrics are a held-out estimate. Cross-validate to choose,
then test once: a second look at the same split warns, since a recipe changed after seeing it has
made it a validation split."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import rich

from railway_defect.data.discovery import Sample
from railway_defect.data.splits import read_split_record
from railway_defect.evaluation.calibration import softmax
from railway_defect.evaluation.predictions import write_predictions
from railway_defect.inference.model import Predictor
from railway_defect.inference.scoring import score_samples
from railway_defect.sweeps.oof import format_metric
from railway_defect.utils.class_report import class_markdown, class_report, photo_groups
from railway_defect.utils.markdown import md_table
from railway_defect.utils.metrics import binary_metrics, negative_label
from railway_defect.utils.outputs import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
SHOWN = ("balanced_accuracy", "recall", "specificity", "precision", "auroc")


def locked_test_split(record: Path, root: Path) -> tuple[list[Sample], dict[Path, str]] | None:
    """The Test split a run recorded, with the digests, when it recorded no Validation split (a
    final model with a locked test); else None."""
    if not record.is_file():
        return None
    splits, digests = read_split_record(record, root)
    return (splits["test"], digests) if splits.get("test") and not splits.get("val") else None


def _warn_if_scored_before(previous: Path) -> None:
    if previous.is_file():
        log.warning(
            "The locked Test split was already scored (%s, %s): report that number; a recipe changed "
            "after seeing it needs a new Test split (another data.test_fraction seed or new photos).",
            previous,
            json.loads(previous.read_text(encoding="utf-8")).get("scored_at", "earlier"),
        )


def evaluate_locked_test(
    predictor: Predictor,
    root: Path,
    record: Path,
    test: tuple[list[Sample], dict[Path, str]],
    out: Path,
    scoring: dict[str, Any],
    confidence: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 42,
) -> dict[str, Any]:
    """Score the recorded Test split (`test`: samples and digests) once at the model's own
    threshold; `scoring`: score_samples' batch_size and cache_dir, as evaluate scores any split."""
    previous = out / "evaluation.json"
    _warn_if_scored_before(previous)
    scored = score_samples(predictor, test[0], record=(record, test[1]), **scoring)
    logits, targets, skipped, samples = scored.logits, scored.targets, scored.skipped, scored.samples
    info, threshold = predictor.contract, predictor.calibration.threshold
    probs = softmax(logits, predictor.calibration.temperature)
    p_positive = probs[:, info.positive_index]
    is_positive = targets == info.positive_index
    negative = negative_label(info.class_names, info.positive_class)
    settings = dict(confidence=confidence, resamples=bootstrap, seed=seed)
    metrics = binary_metrics(is_positive, p_positive, threshold, info.positive_class, negative, **settings)
    predictions = write_predictions(out / "predictions_test.csv", samples, probs, predictor.rule, info)
    report = {
        "model": {**predictor.describe(), "sha256": predictor.sha256},
        "data": {"root": str(root), "splits": str(record), "split": "Test (locked)", "n": int(targets.size)},
        "threshold": {"value": threshold, "chosen_on": predictor.calibration.details or "the recipe"},
        "metrics": {"at_threshold": metrics},
        "decision_rule": predictor.rule.describe(info.class_names),
        "classes": class_report(
            info.class_names,
            info.ordinal,
            predictor.rule,
            targets,
            probs,
            **settings,
            groups=photo_groups(samples),
        ),
        "skipped": skipped,
        "predictions": str(predictions),
        "scored_at": datetime.now().isoformat(timespec="seconds"),
        "output_dir": str(out),
    }
    write_json_atomic(previous, report)
    lines = markdown(report)
    write_text_atomic(out / "evaluation.md", "\n".join(lines) + "\n")
    rich.get_console().print("\n".join(lines[2:]), markup=False, soft_wrap=True)
    return report


def markdown(report: dict[str, Any]) -> list[str]:
    m = report["metrics"]["at_threshold"]
    rows = [[name.replace("_", " "), format_metric(m[name])] for name in SHOWN]
    return [
        f"# The locked Test split of {report['data']['splits']}",
        "",
        f"{report['data']['n']} photos held out of every study step (data.test_fraction), scored once at "
        f"the model's threshold {report['threshold']['value']:.4f}: nothing was fitted on them, so these "
        "are held-out numbers. 95% intervals.",
        "",
        *md_table(["metric", "value"], rows),
        "",
        *class_markdown(report.get("classes")),
    ]

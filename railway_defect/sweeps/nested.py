"""Nested cross-validation estimates (experiment=nested_cv): for each outer fold, the inner folds'
out-of-fold predictions choose what the recipe chooses (one model's threshold for the target
recall), and the refit on the outer fold's other photos (data.fold=refit) scores the outer fold at
it. Nothing chosen has seen an outer fold's photos, so the pooled outer-fold metrics are the
selection-aware estimate to report; the inner out-of-fold numbers, used to choose, are optimistic."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from railway_defect.data.strata import image_size_strata
from railway_defect.sweeps import oof
from railway_defect.utils.markdown import md_table
from railway_defect.utils.metrics import binary_metrics, negative_label
from railway_defect.utils.outputs import write_json_atomic, write_text_atomic

NESTED_FILE = "nested_predictions.csv"
NESTED_JSON = "nested.json"
SHOWN = ("balanced_accuracy", "recall", "specificity", "auroc")


@dataclass
class OuterScore:
    """One outer-fold photo scored by the refit of one seed, and the threshold its inner folds chose."""

    path: str
    label: str
    score: float
    threshold: float
    outer_fold: int
    seed: str


@dataclass
class NestedEstimate:
    configuration: list[str]
    positive_class: str
    outer_folds: int
    target_recall: float
    scores: list[OuterScore]
    # outer fold -> the threshold chosen on its inner out-of-fold predictions
    thresholds: dict[int, float]
    # seed -> stratum -> metrics with intervals (each seed's refits are one model per outer fold)
    metrics: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def seeds(self) -> list[str]:
        return sorted({s.seed for s in self.scores})


def estimate(
    configuration: list[str],
    inner: dict[int, oof.OutOfFold],
    refit_files: dict[int, list[tuple[str, Path]]],
    outer_folds: int,
    target_recall: float = oof.TARGET_RECALL,
    resamples: int = 1000,
) -> NestedEstimate | None:
    """The nested estimate from each outer fold's inner out-of-fold predictions (`inner`, scored
    by oof.score) and its refits' predictions_test.csv (`refit_files`: (seed, file) per outer
    fold). None unless every outer fold has both."""
    if sorted(inner) != list(range(outer_folds)) or sorted(refit_files) != list(range(outer_folds)):
        return None
    thresholds = {k: inner[k].one_model_threshold for k in range(outer_folds)}
    positive = inner[0].positive_class
    column = f"p_{positive}"  # K-class files give every class; the estimate is of the positive one
    scores = [
        OuterScore(row["path"], row["label"], float(row[column]), thresholds[k], k, seed)
        for k in range(outer_folds)
        for seed, file in refit_files[k]
        for row in _rows(file)
    ]
    result = NestedEstimate(configuration, positive, outer_folds, target_recall, scores, thresholds)
    result.metrics = {seed: _seed_metrics(result, seed, resamples) for seed in result.seeds()}
    return result


def _rows(file: Path) -> list[dict[str, str]]:
    with file.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _seed_metrics(result: NestedEstimate, seed: str, resamples: int) -> dict[str, dict[str, Any]]:
    """Metrics of one seed's outer-fold scores, each photo at its own outer fold's threshold,
    overall and per image-size stratum."""
    mine = [s for s in result.scores if s.seed == seed]
    is_pos = np.array([s.label == result.positive_class for s in mine])
    scores = np.array([s.score for s in mine])
    thresholds = np.array([s.threshold for s in mine])
    strata = image_size_strata([s.path for s in mine])
    stratum = np.array([strata[s.path] for s in mine])
    negative = negative_label({s.label for s in mine}, result.positive_class)
    groups = [("all", np.ones(len(mine), dtype=bool)), *((n, stratum == n) for n in sorted(set(stratum)))]
    return {
        name: binary_metrics(
            is_pos[mask], scores[mask], thresholds[mask], result.positive_class, negative, resamples=resamples
        )
        for name, mask in groups
    }


def markdown(results: Sequence[NestedEstimate]) -> list[str]:
    """The nested section of summary.md."""
    if not results:
        return []
    lines = [
        "## Nested cross-validation estimate (report these)",
        "",
        "Each outer fold is scored by the refit on the other outer folds, at one model's threshold "
        f"for defect recall >= {results[0].target_recall} chosen on the inner folds' out-of-fold "
        "predictions alone: no number here was used to choose anything. 95% bootstrap intervals.",
        "",
    ]
    body = [
        [f"`{' '.join(r.configuration) or '(defaults)'}`", seed, f"{stratum} ({m['n']})"]
        + [oof.format_metric(m[name]) for name in SHOWN]
        for r in results
        for seed, by_stratum in r.metrics.items()
        for stratum, m in by_stratum.items()
    ]
    lines += md_table(["configuration", "seed", "stratum (n)", *SHOWN], body)
    thresholds = ", ".join(f"{t:.3f}" for r in results for t in r.thresholds.values())
    return [*lines, "", f"Thresholds chosen by the inner folds (outer fold 0, 1, ...): {thresholds}."]


def summary_line(result: NestedEstimate, stratum: str = "all") -> str:
    """'BA 0.88 [0.83, 0.92], recall 0.95 [...]' of the first seed, for the console."""
    m = result.metrics[result.seeds()[0]][stratum]
    return ", ".join(f"{name} {oof.format_metric(m[name])}" for name in SHOWN)


def to_csv(results: Sequence[NestedEstimate]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["configuration", "seed", "outer_fold", "path", "label", "score", "threshold"])
    for r in results:
        for s in r.scores:
            row = [" ".join(r.configuration), s.seed, s.outer_fold, s.path, s.label]
            writer.writerow([*row, f"{s.score:.6f}", f"{s.threshold:.6f}"])
    return buffer.getvalue()


def to_json(results: Sequence[NestedEstimate]) -> list[dict[str, Any]]:
    return [
        {
            "configuration": r.configuration,
            "positive_class": r.positive_class,
            "outer_folds": r.outer_folds,
            "target_recall": r.target_recall,
            "thresholds": r.thresholds,
            "mean_threshold": statistics.fmean(r.thresholds.values()),
            "images": len({s.path for s in r.scores}),
            "metrics": r.metrics,
        }
        for r in results
    ]


def write(sweep_dir: Path, results: Sequence[NestedEstimate]) -> list[Path]:
    write_text_atomic(sweep_dir / NESTED_FILE, to_csv(results))
    write_json_atomic(sweep_dir / NESTED_JSON, to_json(results))
    return [sweep_dir / NESTED_FILE, sweep_dir / NESTED_JSON]

"""Nested cross-validation estimates (experiment=nested_cv): for each outer fold, the inner folds'
out-of-fold predictions choose what the recipe chooses (one model's threshold for the target
recall), and the refit on the outer fold's other photos (data.fold=refit) scores the outer fold at
it. Nothing chosen has seen an outer fold's photos, so the pooled outer-fold metrics are the
selection-aware estimate to report; the inner out-of-fold numbers, used to choose, are optimistic.
K classes: the inner folds choose one model's class weights too (oof.OutOfFold.one_model_rule, what
`evaluate oof=` stores for a final model), and the outer folds give the K-class report at them."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from railway_defect.data.splits import SPLITS_FILE
from railway_defect.data.strata import image_size_strata
from railway_defect.sweeps import oof
from railway_defect.utils.class_report import class_markdown, labelled_report
from railway_defect.utils.decision import DecisionRule
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
    # K classes: every class's probability, in the model's order
    probs: tuple[float, ...] = ()
    # its photo group (the refit's splits.csv), resampled whole for the K-class intervals
    group: str | None = None


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
    # K classes: their names, whether ordered, each outer fold's chosen rule, and seed -> the
    # K-class report of its outer-fold predictions, each at its own fold's rule
    classes: list[str] = field(default_factory=list)
    ordinal: bool = False
    rules: dict[int, DecisionRule] = field(default_factory=dict)
    class_blocks: dict[str, dict[str, Any]] = field(default_factory=dict)

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
    positive, classes = inner[0].positive_class, inner[0].classes
    scores = [
        score
        for k in range(outer_folds)
        for seed, file in refit_files[k]
        for score in _outer_scores(file, k, seed, thresholds[k], positive, classes)
    ]
    result = NestedEstimate(configuration, positive, outer_folds, target_recall, scores, thresholds)
    result.metrics = {seed: _seed_metrics(result, seed, resamples) for seed in result.seeds()}
    if classes:
        result.classes, result.ordinal = classes, inner[0].ordinal
        result.rules = {k: inner[k].one_model_rule for k in range(outer_folds)}
        result.class_blocks = {seed: _seed_class_block(result, seed, resamples) for seed in result.seeds()}
    return result


def _outer_scores(
    file: Path, fold: int, seed: str, threshold: float, positive: str, classes: list[str]
) -> list[OuterScore]:
    """A refit's outer-fold predictions: p of the positive class (K classes: every p too) and the
    photo group its splits.csv recorded."""
    groups = oof.recorded_groups(file.parent / SPLITS_FILE)
    return [
        OuterScore(
            row["path"],
            row["label"],
            float(row[f"p_{positive}"]),
            threshold,
            fold,
            seed,
            tuple(float(row[f"p_{c}"]) for c in classes),
            oof.group_of(row["path"], groups),
        )
        for row in _rows(file)
    ]


def _seed_class_block(result: NestedEstimate, seed: str, resamples: int) -> dict[str, Any]:
    """K classes: one seed's outer-fold predictions, each photo decided by its outer fold's rule."""
    mine = [s for s in result.scores if s.seed == seed]
    probs, predicted = np.array([s.probs for s in mine]), decided(result, mine)
    targets = np.array([result.classes.index(s.label) for s in mine])
    groups = np.array([s.group for s in mine]) if all(s.group for s in mine) else None
    rule = "each outer fold's class weights, chosen on its inner folds' out-of-fold predictions"
    return labelled_report(
        result.classes, result.ordinal, rule, targets, probs, predicted, resamples=resamples, groups=groups
    )


def decided(result: NestedEstimate, scores: Sequence[OuterScore]) -> np.ndarray:
    """K classes: the class index each outer-fold photo gets from its own outer fold's rule."""
    if not scores:
        return np.zeros(0, dtype=np.int64)
    probs, folds = np.array([s.probs for s in scores]), np.array([s.outer_fold for s in scores])
    predicted = np.zeros(len(scores), dtype=np.int64)
    for k, rule in result.rules.items():
        predicted[folds == k] = rule.labels(probs[folds == k])
    return predicted


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
    lines += ["", f"Thresholds chosen by the inner folds (outer fold 0, 1, ...): {thresholds}."]
    return [*lines, *(line for r in results for line in _class_markdown(r))]


def _class_markdown(result: NestedEstimate) -> list[str]:
    """K classes: each seed's K-class report at the inner folds' class weights, and the weights."""
    if not result.classes:
        return []
    rules = "; ".join(f"outer fold {k}: {rule.describe(result.classes)}" for k, rule in result.rules.items())
    lines = [
        "",
        f"The rows above are the {result.positive_class} class against the rest at its threshold. The "
        f"classes are decided by class weights that each outer fold's inner folds chose (the best macro "
        f"recall whose {result.positive_class} recall reaches {result.target_recall}): {rules}.",
        "",
    ]
    config = " ".join(result.configuration) or "(defaults)"
    for seed, block in result.class_blocks.items():
        lines += class_markdown(
            block, f"Nested estimate of the classes, `{config}`, seed {seed or '(default)'}"
        )
    return lines


def summary_line(result: NestedEstimate, stratum: str = "all") -> str:
    """'BA 0.88 [0.83, 0.92], recall 0.95 [...]' of the first seed, for the console (K classes:
    macro recall and the positive class's recall at the chosen class weights)."""
    seed = result.seeds()[0]
    if result.classes:
        at_rule = result.class_blocks[seed]["at_rule"]
        recall = at_rule["per_class"][result.positive_class]["recall"]
        return (
            f"macro recall {oof.format_metric(at_rule['balanced_accuracy'])}, "
            f"{result.positive_class} recall {oof.format_metric(recall)}"
        )
    m = result.metrics[seed][stratum]
    return ", ".join(f"{name} {oof.format_metric(m[name])}" for name in SHOWN)


def to_csv(results: Sequence[NestedEstimate]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    classes = results[0].classes if results else []
    extra = [*(f"p_{c}" for c in classes), "predicted"] if classes else []
    writer.writerow(["configuration", "seed", "outer_fold", "path", "label", "score", "threshold", *extra])
    for r in results:
        labels = [r.classes[i] for i in decided(r, r.scores)] if r.classes else []
        for i, s in enumerate(r.scores):
            row = [" ".join(r.configuration), s.seed, s.outer_fold, s.path, s.label]
            cells = [*(f"{p:.6f}" for p in s.probs), labels[i]] if r.classes else []
            writer.writerow([*row, f"{s.score:.6f}", f"{s.threshold:.6f}", *cells])
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
            "classes": r.class_blocks or None,
            "class_rules": {k: rule.describe(r.classes) for k, rule in r.rules.items()} or None,
            "class_costs": {k: rule.costs for k, rule in r.rules.items()} or None,
        }
        for r in results
    ]


def write(sweep_dir: Path, results: Sequence[NestedEstimate]) -> list[Path]:
    write_text_atomic(sweep_dir / NESTED_FILE, to_csv(results))
    write_json_atomic(sweep_dir / NESTED_JSON, to_json(results))
    return [sweep_dir / NESTED_FILE, sweep_dir / NESTED_JSON]

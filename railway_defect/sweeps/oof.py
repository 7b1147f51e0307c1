"""Out-of-fold estimates for a cross-validation sweep: every image scored by the fold model that
never trained on it (each job's predictions_val.csv, from its final weights), pooled per
configuration, with intervals, per stratum of image size (the storage form that predicts the label
in the sample data) and for the worst stratum. These are the numbers to select recipes by."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score

from railway_defect.data.splits import SPLITS_FILE
from railway_defect.data.strata import image_size_strata
from railway_defect.utils.class_report import class_markdown, class_report
from railway_defect.utils.decision import DecisionRule, choose_class_weights
from railway_defect.utils.markdown import md_table
from railway_defect.utils.metrics import binary_metrics, choose_threshold, negative_label
from railway_defect.utils.outputs import write_json_atomic, write_text_atomic

OOF_FILE = "oof_predictions.csv"
TARGET_RECALL = 0.95
# what the tables show, from binary_metrics
SHOWN = ("balanced_accuracy", "recall", "specificity", "auroc")


@dataclass
class ImagePrediction:
    path: str
    label: str
    scores: list[float] = field(default_factory=list)
    # K classes: each repeat's probabilities of every class
    class_probs: list[list[float]] = field(default_factory=list)
    # its photo group (the job's splits.csv), resampled whole for the K-class intervals
    group: str | None = None

    @property
    def score(self) -> float:
        return float(np.mean(self.scores))


@dataclass
class OutOfFold:
    """One configuration's pooled out-of-fold predictions and their metrics."""

    configuration: list[str]
    jobs: int
    positive_class: str
    images: list[ImagePrediction]
    strata: dict[str, str]
    # seed -> image path -> the score its fold model of that seed gave it
    repeat_scores: dict[str, dict[str, float]]
    threshold: float = 0.5
    target_recall: float = TARGET_RECALL
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    # one model's threshold: reaches the target recall on every seed's predictions together
    one_model_threshold: float = 0.5
    # one model's estimate: each seed's predictions alone (no mean over seeds), per stratum, at
    # one_model_threshold
    per_seed: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # K classes (three or more): their names in output order, whether ordered, and the K-class
    # report of the mean probabilities at the recipe's threshold (utils/class_report.py)
    classes: list[str] = field(default_factory=list)
    ordinal: bool = False
    class_block: dict[str, Any] | None = None
    # the recipe's own threshold (model.decision_threshold): the K-class report is at it, as
    # nothing is chosen on these predictions
    recipe_threshold: float = 0.5
    # K classes: one model's rule chosen on every seed's predictions together (class weights of the
    # best macro recall whose positive-class recall reaches target_recall); what `evaluate oof=`
    # stores and what a nested sweep's inner folds choose
    one_model_rule: DecisionRule | None = None


def _read_predictions(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _probability_columns(rows: list[dict[str, str]]) -> list[str]:
    return [k for k in rows[0] if k.startswith("p_")]


def pool(
    configuration: list[str],
    prediction_files: Sequence[Path],
    seeds: Sequence[str],
    positive_class: str | None = None,
    ordinal: bool = False,
    recipe_threshold: float = 0.5,
) -> OutOfFold | None:
    """Pool the jobs' predictions: an image's score is its mean over repeats (seeds). Binary files
    give p of the positive class; K-class files p of every class (`positive_class` names the one
    the threshold is on)."""
    images: dict[str, ImagePrediction] = {}
    repeat_scores: dict[str, dict[str, float]] = {}
    columns: list[str] = []
    for file, seed in zip(prediction_files, seeds, strict=True):
        rows = _read_predictions(file)
        if not rows:
            continue
        columns = _probability_columns(rows)
        column = f"p_{positive_class}" if f"p_{positive_class}" in columns else columns[0]
        groups = recorded_groups(file.parent / SPLITS_FILE)
        for row in rows:
            image = images.setdefault(row["path"], ImagePrediction(row["path"], row["label"]))
            image.group = image.group or group_of(row["path"], groups)
            image.scores.append(float(row[column]))
            if len(columns) > 2:
                image.class_probs.append([float(row[c]) for c in columns])
            repeat_scores.setdefault(seed, {})[row["path"]] = float(row[column])
    if not images:
        return None
    ordered = sorted(images.values(), key=lambda i: i.path)
    strata = image_size_strata([i.path for i in ordered])
    positive = column.removeprefix("p_")
    classes = [c.removeprefix("p_") for c in columns] if len(columns) > 2 else []
    return OutOfFold(
        configuration,
        len(prediction_files),
        positive,
        ordered,
        strata,
        repeat_scores,
        classes=classes,
        ordinal=ordinal,
        recipe_threshold=recipe_threshold,
    )


def recorded_groups(splits: Path) -> dict[str, str]:
    """Path (relative to the data root) -> photo group, from a job's splits.csv; {} without one."""
    if not splits.is_file():
        return {}
    return {row["path"]: row["group"] for row in _read_predictions(splits) if row.get("group")}


def group_of(path: str, groups: dict[str, str]) -> str | None:
    """The group of a predicted path (data root + recorded path): its longest recorded suffix."""
    parts = Path(path).parts
    return next((groups[s] for k in range(len(parts)) if (s := "/".join(parts[k:])) in groups), None)


def score(result: OutOfFold, target_recall: float = TARGET_RECALL, resamples: int = 1000) -> OutOfFold:
    """Metrics at 0.5 and at the threshold reaching `target_recall` on these very predictions
    (chosen in-sample: that threshold's recall is optimistic), overall and per stratum."""
    is_pos = np.array([i.label == result.positive_class for i in result.images])
    scores = np.array([i.score for i in result.images])
    negative = negative_label({i.label for i in result.images}, result.positive_class)
    result.target_recall = target_recall
    result.threshold = choose_threshold(is_pos, scores, target_recall) if is_pos.any() else 0.5
    strata = np.array([result.strata[i.path] for i in result.images])
    for name, mask in _stratum_masks(strata):
        for at, threshold in (("0.5", 0.5), ("threshold", result.threshold)):
            result.metrics[f"{name}@{at}"] = binary_metrics(
                is_pos[mask], scores[mask], threshold, result.positive_class, negative, resamples=resamples
            )
    labels = {i.path: i.label == result.positive_class for i in result.images}
    result.one_model_threshold = _one_model_threshold(result.repeat_scores, labels, target_recall)
    result.per_seed = {
        seed: _point_metrics(by_path, labels, result.strata, result.one_model_threshold)
        for seed, by_path in result.repeat_scores.items()
    }
    result.class_block = _class_block(result, resamples)
    result.one_model_rule = _one_model_rule(result)
    return result


def _one_model_rule(result: OutOfFold) -> DecisionRule | None:
    """K classes: the class weights chosen on every seed's predictions together (each image once
    per seed), as `_one_model_threshold` chooses a binary threshold."""
    if not result.classes:
        return None
    targets = [result.classes.index(i.label) for i in result.images for _ in i.class_probs]
    probs = [p for i in result.images for p in i.class_probs]
    positive = result.classes.index(result.positive_class)
    return choose_class_weights(np.array(targets), np.array(probs), positive, result.target_recall)


def ensemble_rule(result: OutOfFold) -> DecisionRule | None:
    """K classes: the class weights chosen on the images' mean probabilities over seeds, as the
    ensemble of the seeds' models scores (and as `threshold` is chosen for a binary ensemble)."""
    if not result.classes:
        return None
    targets = np.array([result.classes.index(i.label) for i in result.images])
    probs = np.array([np.mean(i.class_probs, axis=0) for i in result.images])
    positive = result.classes.index(result.positive_class)
    return choose_class_weights(targets, probs, positive, result.target_recall)


def _class_block(result: OutOfFold, resamples: int) -> dict[str, Any] | None:
    """K classes: the report of the images' mean probabilities over seeds at the recipe's own
    threshold and at argmax; neither is chosen on them, so it is an estimate, not a selection."""
    if not result.classes:
        return None
    probs = np.array([np.mean(i.class_probs, axis=0) for i in result.images])
    targets = np.array([result.classes.index(i.label) for i in result.images])
    rule = DecisionRule(result.classes.index(result.positive_class), result.recipe_threshold)
    grouped = all(i.group for i in result.images)
    groups = np.array([i.group for i in result.images]) if grouped else None
    return class_report(
        result.classes, result.ordinal, rule, targets, probs, resamples=resamples, groups=groups
    )


def _one_model_threshold(
    repeat_scores: dict[str, dict[str, float]], labels: dict[str, bool], target_recall: float
) -> float:
    """The threshold reaching `target_recall` on every seed's predictions together (each image once
    per seed). One model's scores spread more than their mean over seeds, so the mean's threshold
    misses more of one model's defects; a single final model takes this one."""
    pairs = [(labels[path], score) for by_path in repeat_scores.values() for path, score in by_path.items()]
    is_pos = np.array([positive for positive, _ in pairs])
    if not is_pos.any():
        return 0.5
    return choose_threshold(is_pos, np.array([score for _, score in pairs]), target_recall)


def _point_metrics(
    scores: dict[str, float], labels: dict[str, bool], strata: dict[str, str], threshold: float
) -> dict[str, dict[str, float]]:
    """One seed's predictions alone, overall and per stratum: AUROC, and balanced accuracy at 0.5
    and at one model's threshold with the recall there (point values). A single model, such as the
    recipe's final one, is estimated by these, not by the mean over seeds."""
    paths = sorted(scores)
    is_pos = np.array([labels[p] for p in paths])
    score = np.array([scores[p] for p in paths])
    stratum = np.array([strata[p] for p in paths])
    result = {}
    for name, mask in _stratum_masks(stratum):
        pos, sc = is_pos[mask], score[mask]
        if pos.all() or not pos.any():
            continue
        result[name] = {
            "auroc": float(roc_auc_score(pos, sc)),
            "balanced_accuracy@0.5": float(balanced_accuracy_score(pos, sc >= 0.5)),
            "balanced_accuracy@threshold": float(balanced_accuracy_score(pos, sc >= threshold)),
            "recall@threshold": float(recall_score(pos, sc >= threshold)),
        }
    return result


def _stratum_masks(strata: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """`all`, then each stratum, with the mask of its images."""
    return [("all", np.ones(len(strata), dtype=bool)), *((s, strata == s) for s in sorted(set(strata)))]


def one_model_summary(per_seed: dict[str, dict[str, dict[str, float]]], stratum: str, metric: str) -> str:
    """A metric of one model over the seeds (OutOfFold.per_seed): mean [min, max]; one seed: its value."""
    values = [m[stratum][metric] for m in per_seed.values() if stratum in m]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def worst_stratum(result: OutOfFold) -> str | None:
    """The stratum with the lowest balanced accuracy at the threshold."""
    values = {
        key.split("@")[0]: m["balanced_accuracy"]["value"]
        for key, m in result.metrics.items()
        if key.endswith("@threshold") and not key.startswith("all@")
    }
    values = {k: v for k, v in values.items() if v is not None}
    return min(values, key=values.__getitem__) if values else None


def format_metric(metric: dict[str, Any]) -> str:
    if metric.get("value") is None:
        return "n/a"
    return f"{metric['value']:.3f} [{metric['low']:.2f}, {metric['high']:.2f}]"


def markdown(results: Sequence[OutOfFold]) -> list[str]:
    """The out-of-fold section of summary.md."""
    return [
        "## Out-of-fold estimates (pooled over folds; an image's score is its mean over seeds)",
        "",
        "Each image is scored by the fold model that never trained on it, from its final weights "
        "(no validation metric selected them). 95% intervals. The threshold reaches recall "
        f">= {results[0].target_recall if results else TARGET_RECALL} on these same predictions, so metrics "
        "at it are optimistic.",
        "",
        *markdown_table(results),
        "",
        "### One model's estimate (each seed's predictions alone, at one model's threshold)",
        "",
        "The mean over seeds scores each image by several models, an ensemble; one trained model, "
        "such as the recipe's final one, is estimated by these: mean [min, max] over seeds. One "
        "model's threshold reaches the same recall on every seed's predictions together (each image "
        "once per seed; also optimistic); `evaluate` gives it to a final model.",
        "",
        *one_model_table(results),
        "",
        *(
            line
            for r in results
            for line in class_markdown(
                r.class_block,
                f"Classes of `{_config(r)}` (out of fold, at the recipe's threshold: chosen on nothing here)",
            )
        ),
    ]


ONE_MODEL_SHOWN = ("auroc", "balanced_accuracy@0.5", "balanced_accuracy@threshold", "recall@threshold")


def one_model_table(results: Sequence[OutOfFold]) -> list[str]:
    body = [
        [f"`{_config(r)}`", str(len(r.per_seed)), stratum, f"{r.one_model_threshold:.3f}"]
        + [one_model_summary(r.per_seed, stratum, metric) for metric in ONE_MODEL_SHOWN]
        for r in results
        for stratum in [k.split("@")[0] for k in r.metrics if k.endswith("@0.5")]
    ]
    return md_table(["configuration", "seeds", "stratum", "threshold", *ONE_MODEL_SHOWN], body)


def markdown_table(results: Sequence[OutOfFold]) -> list[str]:
    """One row per configuration, stratum and threshold."""
    body = [
        [f"`{_config(r)}`", str(r.jobs), f"{key.split('@')[0]} ({m['n']})", _at(r, key)]
        + [format_metric(m[name]) for name in SHOWN]
        for r in results
        for key, m in r.metrics.items()
    ]
    return md_table(["configuration", "jobs", "stratum (n)", "at", *SHOWN], body)


def _config(result: OutOfFold) -> str:
    return " ".join(result.configuration) or "(defaults)"


def _at(result: OutOfFold, key: str) -> str:
    return f"{result.threshold:.3f}" if key.endswith("@threshold") else "0.5"


def to_csv(results: Sequence[OutOfFold]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["configuration", "path", "label", "score", "repeats", "stratum"])
    for r in results:
        config = " ".join(r.configuration)
        for i in r.images:
            writer.writerow([config, i.path, i.label, f"{i.score:.6f}", len(i.scores), r.strata[i.path]])
    return buffer.getvalue()


def to_json(results: Sequence[OutOfFold]) -> list[dict[str, Any]]:
    return [
        {
            "configuration": r.configuration,
            "jobs": r.jobs,
            "images": len(r.images),
            "positive_class": r.positive_class,
            "threshold": r.threshold,
            "threshold_target_recall": r.target_recall,
            "one_model_threshold": r.one_model_threshold,
            "worst_stratum": worst_stratum(r),
            "per_seed": r.per_seed,
            "metrics": r.metrics,
            "classes": r.class_block,
            "one_model_rule": None if r.one_model_rule is None else r.one_model_rule.describe(r.classes),
            "one_model_costs": None if r.one_model_rule is None else r.one_model_rule.costs,
        }
        for r in results
    ]


def write(sweep_dir: Path, results: Sequence[OutOfFold]) -> None:
    write_text_atomic(sweep_dir / OOF_FILE, to_csv(results))
    write_json_atomic(sweep_dir / "oof.json", to_json(results))

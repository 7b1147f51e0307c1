"""Metrics of the positive class with 95% confidence intervals (Wilson for proportions, a
stratified bootstrap for balanced accuracy, F1 and AUROC), and the choice of an operating
threshold that reaches a target recall with the best precision."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_curve, roc_auc_score


def wilson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion; None when there are no trials."""
    if trials == 0:
        return None
    interval = binomtest(int(successes), int(trials)).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def _proportion(successes: int, trials: int, confidence: float) -> dict[str, Any]:
    interval = wilson(successes, trials, confidence)
    return {
        "value": successes / trials if trials else None,
        "low": interval[0] if interval else None,
        "high": interval[1] if interval else None,
        "successes": int(successes),
        "trials": int(trials),
        "method": "wilson",
    }


Statistic = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def _bootstrap(
    statistic: Statistic,
    is_positive: np.ndarray,
    predicted: np.ndarray,
    scores: np.ndarray,
    confidence: float,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Point estimate and percentile interval over resamples drawn within each class (so every
    resample has the class balance of the data, and AUROC stays defined)."""
    if is_positive.all() or not is_positive.any():
        return {"value": None, "low": None, "high": None, "method": "undefined: one class only"}
    value = float(statistic(is_positive, predicted, scores))
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(is_positive), np.flatnonzero(~is_positive)
    values = np.empty(resamples)
    for r in range(resamples):
        idx = np.concatenate([rng.choice(positives, positives.size), rng.choice(negatives, negatives.size)])
        values[r] = statistic(is_positive[idx], predicted[idx], scores[idx])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return {"value": value, "low": float(low), "high": float(high), "method": f"bootstrap ({resamples})"}


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray, _: np.ndarray) -> float:
    return balanced_accuracy_score(y, pred)


def _f1(y: np.ndarray, pred: np.ndarray, _: np.ndarray) -> float:
    return f1_score(y, pred, zero_division=0.0)


def _auroc(y: np.ndarray, _: np.ndarray, scores: np.ndarray) -> float:
    return roc_auc_score(y, scores)


def binary_metrics(
    is_positive: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    positive_class: str,
    negative_label: str,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Positive-class metrics of `scores >= threshold`, each with its interval, and the confusion matrix."""
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    predicted = scores >= threshold
    tp = int(np.sum(predicted & is_positive))
    fp = int(np.sum(predicted & ~is_positive))
    fn = int(np.sum(~predicted & is_positive))
    tn = int(np.sum(~predicted & ~is_positive))
    boot = {"confidence": confidence, "resamples": resamples, "seed": seed}
    return {
        "threshold": float(threshold),
        "n": int(is_positive.size),
        "accuracy": _proportion(tp + tn, is_positive.size, confidence),
        "balanced_accuracy": _bootstrap(_balanced_accuracy, is_positive, predicted, scores, **boot),
        "precision": _proportion(tp, tp + fp, confidence),
        "recall": _proportion(tp, tp + fn, confidence),
        "specificity": _proportion(tn, tn + fp, confidence),
        "f1": _bootstrap(_f1, is_positive, predicted, scores, **boot),
        "auroc": _bootstrap(_auroc, is_positive, predicted, scores, **boot),
        "confusion_matrix": {
            "rows": "true",
            "columns": "predicted",
            "labels": [positive_class, negative_label],
            "matrix": [[tp, fn], [fp, tn]],
        },
    }


def choose_threshold(is_positive: np.ndarray, scores: np.ndarray, target_recall: float) -> float:
    """The threshold (predict positive when score >= it) with the best precision among those whose
    recall reaches `target_recall`; ties go to the higher threshold. It is placed halfway to the next
    lower score, so that the same images score the same side of it despite rounding."""
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if not is_positive.any():
        raise ValueError("no positive sample to reach a recall with")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target recall {target_recall} must be in (0, 1]")
    precision, recall, thresholds = precision_recall_curve(is_positive, scores)
    # the last (precision, recall) pair has no threshold
    reaching = np.flatnonzero(recall[:-1] >= target_recall)
    best = reaching[np.lexsort((thresholds[reaching], precision[reaching]))[-1]]
    chosen = float(thresholds[best])
    below = scores[scores < chosen]
    return (chosen + (float(below.max()) if below.size else 0.0)) / 2.0

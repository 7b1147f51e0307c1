"""Metrics of the positive class with 95% confidence intervals (Wilson for proportions, a
stratified bootstrap for balanced accuracy, F1 and AUROC), and the choice of an operating
threshold that reaches a target recall with the best precision."""

from __future__ import annotations

from functools import partial
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


# above this many (positive, negative) pairs the AUROC resamples are computed one by one
PAIRWISE_LIMIT = 4_000_000
STATISTICS = ("balanced_accuracy", "f1", "auroc")


def _resampled_counts(size: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, size): how often each item is drawn in each bootstrap resample."""
    return rng.multinomial(size, np.full(size, 1.0 / size), size=resamples).astype(np.float64)


def _resampled_auroc(
    pos_scores: np.ndarray, neg_scores: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray
) -> np.ndarray:
    """Mann-Whitney AUROC of every resample from the weights of each positive and negative."""
    if pos_scores.size * neg_scores.size <= PAIRWISE_LIMIT:
        wins = (pos_scores[:, None] > neg_scores[None, :]) + 0.5 * (
            pos_scores[:, None] == neg_scores[None, :]
        )
        pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)  # the sizes, unless whole groups were drawn
        return np.einsum("rp,rp->r", w_pos, w_neg @ wins.T) / np.where(pairs > 0, pairs, np.nan)
    scores = np.concatenate([pos_scores, neg_scores])
    labels = np.r_[np.ones(pos_scores.size), np.zeros(neg_scores.size)]
    return np.array(
        [
            roc_auc_score(labels, scores, sample_weight=np.r_[wp, wn])
            for wp, wn in zip(w_pos, w_neg, strict=True)
        ]
    )


def _bootstrap(
    is_positive: np.ndarray,
    predicted: np.ndarray,
    scores: np.ndarray,
    confidence: float,
    resamples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Balanced accuracy, F1 and AUROC with percentile intervals over resamples drawn within each
    class (every resample keeps the class balance of the data, and AUROC stays defined). Resamples
    are computed at once from draw counts, not by scoring each resampled copy."""
    if is_positive.all() or not is_positive.any():
        undefined = {"value": None, "low": None, "high": None, "method": "undefined: one class only"}
        return {name: dict(undefined) for name in STATISTICS}
    values = {
        "balanced_accuracy": balanced_accuracy_score(is_positive, predicted),
        "f1": f1_score(is_positive, predicted, zero_division=0.0),
        "auroc": roc_auc_score(is_positive, scores),
    }
    rng = np.random.default_rng(seed)
    pos, neg = is_positive, ~is_positive
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    w_pos, w_neg = _resampled_counts(n_pos, resamples, rng), _resampled_counts(n_neg, resamples, rng)
    tp, fp = w_pos @ predicted[pos].astype(np.float64), w_neg @ predicted[neg].astype(np.float64)
    fn, tn = n_pos - tp, n_neg - fp
    denominator = 2 * tp + fp + fn
    resampled = {
        "balanced_accuracy": (tp / n_pos + tn / n_neg) / 2,
        "f1": np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0),
        "auroc": _resampled_auroc(scores[pos], scores[neg], w_pos, w_neg),
    }
    alpha = (1.0 - confidence) / 2.0
    result = {}
    for name in STATISTICS:
        low, high = np.quantile(resampled[name], [alpha, 1.0 - alpha])
        result[name] = {
            "value": float(values[name]),
            "low": float(low),
            "high": float(high),
            "method": f"bootstrap ({resamples})",
        }
    return result


def negative_label(class_names: list[str] | set[str], positive_class: str) -> str:
    """The name of `not positive`: the other class when there are two, else `not <positive>`."""
    others = sorted(set(class_names) - {positive_class})
    return others[0] if len(others) == 1 else f"not {positive_class}"


def binary_metrics(
    is_positive: np.ndarray,
    scores: np.ndarray,
    threshold: float | np.ndarray,
    positive_class: str,
    negative_label: str,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Positive-class metrics of `scores >= threshold`, each with its interval, and the confusion
    matrix. `threshold` may be one per image (nested CV: each outer fold's own); it is then
    reported as None."""
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    predicted = scores >= threshold
    tp = int(np.sum(predicted & is_positive))
    fp = int(np.sum(predicted & ~is_positive))
    fn = int(np.sum(~predicted & is_positive))
    tn = int(np.sum(~predicted & ~is_positive))
    boot = _bootstrap(is_positive, predicted, scores, confidence, resamples, seed)
    return {
        "threshold": float(threshold) if np.ndim(threshold) == 0 else None,
        "n": int(is_positive.size),
        "accuracy": _proportion(tp + tn, is_positive.size, confidence),
        "balanced_accuracy": boot["balanced_accuracy"],
        "precision": _proportion(tp, tp + fp, confidence),
        "recall": _proportion(tp, tp + fn, confidence),
        "specificity": _proportion(tn, tn + fp, confidence),
        "f1": boot["f1"],
        "auroc": boot["auroc"],
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


def _confusions(targets: np.ndarray, predicted: np.ndarray, k: int, weights: np.ndarray) -> np.ndarray:
    """(R, K, K) confusion matrices (true x predicted) of the resamples given by `weights` (R, N)."""
    pairs = np.zeros((targets.size, k * k))
    pairs[np.arange(targets.size), targets * k + predicted] = 1.0
    return (weights @ pairs).reshape(-1, k, k)


def _per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support of (R, K, K) confusions, each (R, K)."""
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    support, called = confusion.sum(axis=2), confusion.sum(axis=1)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    precision = np.divide(hits, called, out=np.zeros_like(hits), where=called > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(hits), where=total > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def _stratified_weights(targets: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(1 + R, N) draw counts: the data itself, then R bootstrap resamples drawn within each class."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, targets.size))
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        weights[:, members] = _resampled_counts(members.size, resamples, rng)
    return np.vstack([np.ones(targets.size), weights])


def _group_weights(targets: np.ndarray, groups: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(1 + R, N) draw counts of a cluster bootstrap: whole photo groups (near-duplicate frames, a
    burst) drawn with replacement within each class of their first image, every image of a group
    counted as often as its group is drawn. Images of one group are not independent, so resampling
    them one by one gives intervals that are too narrow."""
    rng = np.random.default_rng(seed)
    names, index = np.unique(groups, return_inverse=True)
    first = np.array([targets[np.flatnonzero(index == g)[0]] for g in range(names.size)])
    group_counts = np.zeros((resamples, names.size))
    for c in np.unique(first):
        members = np.flatnonzero(first == c)
        group_counts[:, members] = _resampled_counts(members.size, resamples, rng)
    return np.vstack([np.ones(targets.size), group_counts[:, index]])


def _ovr_auroc(targets: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(1 + R, K) one-vs-rest AUROC of each class in the data and in each resample."""
    columns = []
    for c in range(probs.shape[1]):
        pos, neg = targets == c, targets != c
        if not pos.any() or not neg.any():
            columns.append(np.full(weights.shape[0], np.nan))
            continue
        columns.append(_resampled_auroc(probs[pos, c], probs[neg, c], weights[:, pos], weights[:, neg]))
    return np.stack(columns, axis=1)


def _interval(values: np.ndarray, confidence: float, method: str) -> dict[str, Any]:
    """values[0]: on the data; values[1:]: the resamples."""
    if np.isnan(values[0]):
        return {"value": None, "low": None, "high": None, "method": "undefined: one class only"}
    alpha = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(values[1:], [alpha, 1.0 - alpha])
    return {"value": float(values[0]), "low": float(low), "high": float(high), "method": method}


def _ordinal_errors(
    targets: np.ndarray, predicted: np.ndarray, weights: np.ndarray, k: int, confidence: float, method: str
) -> dict[str, Any]:
    """For ordered classes (index = severity): errors by distance, mean absolute class error, and
    how often a photo is called less severe than it is (the costly direction)."""
    distance = predicted - targets
    n = weights.sum(axis=1)
    by_distance = {
        f"{d}_step{'s' if d > 1 else ''}": _interval(
            weights @ (np.abs(distance) == d) / n, confidence, method
        )
        for d in range(1, k)
    }
    return {
        "mean_absolute_error": _interval(weights @ np.abs(distance) / n, confidence, method),
        "by_distance": by_distance,
        "under_called": _interval(weights @ (distance < 0) / n, confidence, method),
        "over_called": _interval(weights @ (distance > 0) / n, confidence, method),
    }


def _resampling(
    targets: np.ndarray, groups: np.ndarray | None, resamples: int, seed: int
) -> tuple[str, np.ndarray]:
    """The interval method's name and its (1 + R, N) weights: images, or whole groups, per class."""
    if groups is None:
        return f"stratified bootstrap ({resamples})", _stratified_weights(targets, resamples, seed)
    method = f"stratified group bootstrap ({resamples}, {np.unique(groups).size} groups)"
    return method, _group_weights(targets, np.asarray(groups), resamples, seed)


def multiclass_metrics(
    targets: np.ndarray,
    probs: np.ndarray,
    predicted: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    ordinal: bool = False,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """K-class metrics of `predicted` (class indices) against `targets`, each with a percentile
    interval over bootstrap resamples drawn within each class (whole `groups` when given): the K x K
    confusion matrix (counts and row-normalised), precision, recall and F1 of every class, their
    macro and support-weighted means, balanced accuracy (= macro recall), accuracy, one-vs-rest
    AUROC of every class and their macro mean; for ordered classes, errors by distance too."""
    targets, predicted = np.asarray(targets, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    k = len(class_names)
    method, weights = _resampling(targets, groups, resamples, seed)
    confusion = _confusions(targets, predicted, k, weights)
    per = _per_class(confusion)
    share = per["support"] / per["support"].sum(axis=1, keepdims=True)
    auroc = _ovr_auroc(targets, np.asarray(probs, dtype=np.float64), weights)
    present = per["support"][0] > 0
    counts = confusion[0].astype(int)
    interval = partial(_interval, confidence=confidence, method=method)
    names = ("precision", "recall", "f1")
    result = {
        "n": int(targets.size),
        "classes": list(class_names),
        "accuracy": interval(np.trace(confusion, axis1=1, axis2=2) / weights.sum(axis=1)),
        "balanced_accuracy": interval(per["recall"][:, present].mean(axis=1)),
        "macro": {name: interval(per[name][:, present].mean(axis=1)) for name in names},
        "weighted": {name: interval((per[name] * share).sum(axis=1)) for name in names},
        "auroc_macro": interval(np.nanmean(auroc, axis=1)),
        "per_class": {
            c: {
                **{name: interval(per[name][:, i]) for name in names},
                "auroc": interval(auroc[:, i]),
                "support": int(counts[i].sum()),
            }
            for i, c in enumerate(class_names)
        },
        "confusion_matrix": _confusion_block(counts, class_names),
    }
    if ordinal:
        result["ordinal"] = _ordinal_errors(targets, predicted, weights, k, confidence, method)
    return result


def _confusion_block(counts: np.ndarray, class_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The K x K counts (rows true, columns predicted) and each row as shares of its class."""
    row_normalised = np.divide(counts, counts.sum(axis=1, keepdims=True).clip(min=1))
    return {
        "rows": "true",
        "columns": "predicted",
        "labels": list(class_names),
        "matrix": counts.tolist(),
        "row_normalised": np.round(row_normalised, 4).tolist(),
    }


def expected_cost(
    targets: np.ndarray,
    predicted: np.ndarray,
    costs: Any,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """The mean cost per photo of `predicted` under a K x K cost matrix (true x predicted), with a
    stratified bootstrap interval (of whole `groups` when given, as multiclass_metrics)."""
    targets, predicted = np.asarray(targets, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    method, weights = _resampling(targets, groups, resamples, seed)
    per_photo = np.asarray(costs, dtype=np.float64)[targets, predicted]
    return _interval(weights @ per_photo / weights.sum(axis=1), confidence, method)

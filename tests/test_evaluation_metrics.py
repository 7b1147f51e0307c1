"""Intervals, the operating threshold and temperature scaling on synthetic scores with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from railway_defect.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    softmax,
)
from railway_defect.utils.metrics import binary_metrics, choose_threshold, wilson

INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auroc")


def test_wilson_matches_the_textbook_interval() -> None:
    low, high = wilson(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson(0, 20)[0] == 0.0 and 0.1 < wilson(0, 20)[1] < 0.2  # never below 0, never empty
    assert wilson(3, 0) is None


def _scores(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    is_positive = rng.random(n) < 0.6
    scores = np.clip(rng.normal(np.where(is_positive, 0.65, 0.35), 0.18), 0, 1)
    return is_positive, scores


def test_metrics_intervals_contain_their_estimates() -> None:
    is_positive, scores = _scores()
    m = binary_metrics(is_positive, scores, 0.5, "Defective", "Non defective", resamples=300)
    for name in INTERVAL_METRICS:
        assert m[name]["low"] <= m[name]["value"] <= m[name]["high"], name
        assert m[name]["low"] >= 0.0 and m[name]["high"] <= 1.0
    predicted = scores >= 0.5
    assert m["f1"]["value"] == pytest.approx(f1_score(is_positive, predicted))
    assert m["auroc"]["value"] == pytest.approx(roc_auc_score(is_positive, scores))
    (tp, fn), (fp, tn) = m["confusion_matrix"]["matrix"]
    assert tp + fn + fp + tn == 200 and tp == int(np.sum(predicted & is_positive))
    assert m["recall"]["value"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"]["value"] == pytest.approx(tn / (tn + fp))


def test_undefined_metrics_are_null_not_errors() -> None:
    m = binary_metrics(np.array([True, True, False]), np.array([0.1, 0.2, 0.3]), 0.9, "D", "N", resamples=50)
    assert m["precision"]["value"] is None  # nothing predicted positive
    assert m["recall"]["value"] == 0.0
    only_positives = binary_metrics(np.array([True, True]), np.array([0.6, 0.7]), 0.5, "D", "N", resamples=50)
    assert only_positives["auroc"]["value"] is None and only_positives["specificity"]["value"] is None


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 1.0])
def test_threshold_reaches_the_recall_with_the_best_precision(target: float) -> None:
    is_positive, scores = _scores(seed=1)
    threshold = choose_threshold(is_positive, scores, target)
    predicted = scores >= threshold
    recall = np.sum(predicted & is_positive) / is_positive.sum()
    precision = np.sum(predicted & is_positive) / predicted.sum()
    assert recall >= target
    # brute force over every candidate threshold
    best = max(
        np.sum((scores >= t) & is_positive) / np.sum(scores >= t)
        for t in np.unique(scores)
        if np.sum((scores >= t) & is_positive) / is_positive.sum() >= target
    )
    assert precision == pytest.approx(best)
    # halfway between two scores: the same images fall on the same side despite rounding
    assert not np.any(np.isclose(scores, threshold, atol=1e-9))


def test_threshold_needs_a_positive() -> None:
    with pytest.raises(ValueError):
        choose_threshold(np.zeros(4, dtype=bool), np.linspace(0, 1, 4), 0.9)


def test_temperature_scaling_undoes_overconfidence() -> None:
    rng = np.random.default_rng(0)
    n, true_temperature = 4000, 3.0
    calibrated = rng.normal(0, 2.0, size=(n, 2))
    targets = np.array([rng.choice(2, p=p) for p in softmax(calibrated)])
    overconfident = calibrated * true_temperature
    temperature = fit_temperature(overconfident, targets)
    assert temperature == pytest.approx(true_temperature, rel=0.15)
    before = expected_calibration_error(softmax(overconfident), targets)
    after = expected_calibration_error(softmax(overconfident, temperature), targets)
    assert after < before / 2


def test_reliability_bins_cover_every_sample() -> None:
    probs = softmax(np.random.default_rng(0).normal(size=(50, 3)))
    targets = np.zeros(50, dtype=int)
    rows = reliability_bins(probs, targets, bins=5)
    assert len(rows) == 5 and sum(r["count"] for r in rows) == 50
    for r in rows:
        if r["count"]:
            assert r["low"] <= r["confidence"] <= r["high"]


def test_ece_is_the_gap_the_reliability_bins_show() -> None:
    # confidences on a bin edge (0.6) and just above it: the diagram puts 0.6 in (0.5, 0.6]
    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.65, 0.35], [0.65, 0.35]])
    targets = np.array([0, 0, 1, 1])
    rows = reliability_bins(probs, targets, bins=10)
    filled = [r for r in rows if r["count"]]
    assert [(r["high"], r["count"]) for r in filled] == [(pytest.approx(0.6), 2), (pytest.approx(0.7), 2)]
    gap = sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in filled) / len(targets)
    assert gap == pytest.approx(0.5 * 0.4 + 0.5 * 0.65)
    assert expected_calibration_error(probs, targets, bins=10) == pytest.approx(gap)

"""DecisionRule: how a model's class probabilities become one label, the one implementation that
predict, serve, evaluate and the out-of-fold summaries share. Two rules, as evaluate fits them:
- a threshold on p(positive class): at or above it the positive class (for K classes: the worst
  one, e.g. a `Poor` sleeper), else the likeliest other class. Binary models have only this rule;
- a cost matrix (rows: true class, columns: predicted, in the model's class order): the label of
  least expected cost under the probabilities (Bayes' rule). For two classes it is a threshold
  (`threshold_for_costs`), so binary models keep one rule. Class weights on the probabilities
  (label = argmax of w_k p_k, what `choose_class_weights` fits for K classes) are the cost matrix
  whose row k is w_k off the diagonal (`class_weight_costs`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from railway_defect.utils.errors import UserError

log = logging.getLogger(__name__)

Costs = tuple[tuple[float, ...], ...]


def check_costs(costs: Sequence[Sequence[float]], class_names: Sequence[str]) -> Costs:
    """`costs` as a K x K tuple of non-negative numbers with zeros on the diagonal, else one line
    that says the shape and order expected."""
    k = len(class_names)
    order = ", ".join(class_names)
    try:
        matrix = np.asarray([[float(v) for v in row] for row in costs], dtype=np.float64)
    except (TypeError, ValueError):
        matrix = np.zeros((0, 0))
    if matrix.shape != (k, k):
        shape = "x".join(str(n) for n in matrix.shape) or "not a matrix"
        raise UserError(
            f"costs must be a {k}x{k} matrix (rows: the true class, columns: the predicted class, both in "
            f"the order {order}), got {shape}."
        )
    if not np.isfinite(matrix).all() or (matrix < 0).any() or np.diag(matrix).any():
        raise UserError(
            f"costs must be finite and non-negative with 0 on the diagonal (a right label costs nothing); "
            f"got {matrix.tolist()} for the classes {order}."
        )
    return tuple(tuple(float(v) for v in row) for row in matrix)


def threshold_for_costs(costs: Costs, positive_index: int) -> float:
    """Two classes: the p(positive) at which calling it positive starts to cost less than not."""
    negative = 1 - positive_index
    false_alarm, miss = costs[negative][positive_index], costs[positive_index][negative]
    if false_alarm + miss == 0:
        raise UserError("costs of 0 for both errors leave nothing to decide; give at least one cost.")
    return false_alarm / (false_alarm + miss)


@dataclass(frozen=True)
class DecisionRule:
    """Args:
    positive_index: the class the threshold is on.
    threshold: p(positive) at or above which a photo is called positive (unused with costs).
    costs: a K x K cost matrix (true x predicted): then the least expected cost decides.
    """

    positive_index: int
    threshold: float
    costs: Costs | None = None

    def labels(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) probabilities -> (N,) class indices."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.costs is not None:
            return np.argmin(probs @ np.asarray(self.costs), axis=1)
        others = probs.copy()
        others[:, self.positive_index] = -np.inf
        positive = probs[:, self.positive_index] >= self.threshold
        return np.where(positive, self.positive_index, others.argmax(axis=1))

    def class_weights(self) -> list[float] | None:
        """The weights w of a cost rule that is argmax(w * p) (class_weight_costs), else None."""
        if self.costs is None or len(self.costs) < 3:
            return None
        off = [[v for j, v in enumerate(row) if j != i] for i, row in enumerate(self.costs)]
        return [row[0] for row in off] if all(len(set(row)) == 1 for row in off) else None

    def describe(self, class_names: Sequence[str]) -> str:
        if (weights := self.class_weights()) is not None:
            shown = ", ".join(f"{c} {w:.3g}" for c, w in zip(class_names, weights, strict=True))
            return f"the likeliest class after weighting the probabilities ({shown})"
        if self.costs is not None:
            return f"least expected cost (costs {[list(r) for r in self.costs]}, order {list(class_names)})"
        return f"{class_names[self.positive_index]} when p >= {self.threshold:.4g}, else the likeliest other"


def class_weight_costs(weights: Sequence[float]) -> Costs:
    """The cost matrix whose least expected cost is the argmax of weights * probabilities: missing a
    class k costs w_k whatever it is called."""
    k = len(weights)
    return tuple(tuple(0.0 if i == j else float(weights[i]) for j in range(k)) for i in range(k))


LOG_WEIGHT_GRID = np.linspace(-4.0, 4.0, 161)


def choose_class_weights(
    targets: np.ndarray, probs: np.ndarray, positive_index: int, target_recall: float, passes: int = 5
) -> DecisionRule:
    """K classes: the class weights (a cost rule) of the highest macro recall on these predictions
    among those whose recall of the positive (worst) class reaches `target_recall`; the positive
    class's recall first where none does. Coordinate ascent over log-weights from the argmax (all
    weights 1), each step to the middle of the best values, so a flat optimum does not drift to
    its edge. Chosen in-sample: its recall here is optimistic; nested CV measures the choice."""
    targets, log_p = np.asarray(targets), np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))
    k = log_p.shape[1]
    log_w = np.zeros(k)
    if not (targets == positive_index).any():
        log.warning(
            "No photo of the positive class (index %d) among these predictions: its recall cannot be "
            "checked, so the classes are decided by the likeliest class (all weights 1).",
            positive_index,
        )
        return DecisionRule(positive_index, 0.5, class_weight_costs(np.ones(k)))
    for _ in range(passes):
        before = log_w.copy()
        for c in range(k):
            candidates = np.repeat(log_w[None], LOG_WEIGHT_GRID.size, axis=0)
            candidates[:, c] = LOG_WEIGHT_GRID
            values = np.array(
                [_weight_objective(targets, log_p + w, positive_index, target_recall) for w in candidates]
            )
            best = np.flatnonzero(np.isclose(values, values.max()))
            log_w[c] = LOG_WEIGHT_GRID[best[len(best) // 2]]
        if np.array_equal(before, log_w):
            break
    weights = np.exp(log_w - log_w.max())
    return DecisionRule(positive_index, 0.5, class_weight_costs(np.round(weights, 6)))


def _weight_objective(
    targets: np.ndarray, scores: np.ndarray, positive_index: int, target_recall: float
) -> float:
    """Macro recall where the positive class reaches its target recall; below it, the positive
    recall minus 1 (always lower), so an infeasible start climbs towards the target first."""
    predicted = scores.argmax(axis=1)
    recalls = [np.mean(predicted[targets == c] == c) for c in np.unique(targets)]
    positive = np.mean(predicted[targets == positive_index] == positive_index)
    return float(np.mean(recalls)) if positive >= target_recall else float(positive) - 1.0


def top_classes(probs: np.ndarray, k: int) -> np.ndarray:
    """(K,) probabilities -> the indices of the k likeliest classes, likeliest first (ties: class order)."""
    return np.argsort(-np.asarray(probs), kind="stable")[:k]

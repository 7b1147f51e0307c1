"""DecisionRule: how a model's class probabilities become one label, the one implementation that
predict, serve, evaluate and the out-of-fold summaries share. Two rules, as evaluate fits them:
- a threshold on p(positive class): at or above it the positive class (for K classes: the worst
  one, e.g. a `Poor` sleeper), else the likeliest other class. Binary models have only this rule;
- a cost matrix (rows: true class, columns: predicted, in the model's class order): the label of
  least expected cost under the probabilities (Bayes' rule). For two classes it is a threshold
  (`threshold_for_costs`), so binary models keep one rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from railway_defect.utils.errors import UserError

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

    def describe(self, class_names: Sequence[str]) -> str:
        if self.costs is not None:
            return f"least expected cost (costs {[list(r) for r in self.costs]}, order {list(class_names)})"
        return f"{class_names[self.positive_index]} when p >= {self.threshold:.4g}, else the likeliest other"


def top_classes(probs: np.ndarray, k: int) -> np.ndarray:
    """(K,) probabilities -> the indices of the k likeliest classes, likeliest first (ties: class order)."""
    return np.argsort(-np.asarray(probs), kind="stable")[:k]

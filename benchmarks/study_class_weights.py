"""A K-class decision rule chosen by nested cross-validation (issue 29, STUDY.md "Sleepers"): class
weights on the probabilities (utils/decision.choose_class_weights: the highest macro recall whose
Poor recall reaches a target) chosen on the inner folds' out-of-fold predictions, applied to the
outer fold by the refit on the inner folds' frames, against the recipe's fixed rule (Poor when
p(Poor) >= 0.5, else the likelier other class).

The head is the recipe's (study_ordinal.py's softmax head, as the framework trains it) on the
frozen Lite2 features of study_features.py. Outer and inner folds are group-aware 5-fold; every
frame is scored once per split seed, by a model and a rule chosen without it, so the numbers are
nested estimates with 95% stratified group-bootstrap intervals.

    python benchmarks/study_features.py --root ../shared/datasets/concrete-sleepers \
        --out outputs/sleeper_features --variants lite2_none384
    python benchmarks/study_class_weights.py --features outputs/sleeper_features --seeds 1,2,3
"""

from __future__ import annotations

import json

import numpy as np
from _common import machine_info
from study_ordinal import CLASSES, RULE, fit, load_sleepers, probabilities, sleeper_parser

from railway_defect.data.discovery import _group_folds
from railway_defect.utils.decision import DecisionRule, choose_class_weights
from railway_defect.utils.metrics import multiclass_metrics

POOR = CLASSES.index("Poor")


def _folds(y: np.ndarray, groups: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (np.asarray(a), np.asarray(b))
        for a, b in _group_folds([CLASSES[i] for i in y], list(groups), 5, seed)
    ]


def _fold_probs(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
    return probabilities("softmax", fit("softmax", x[train], y[train], seed), x[test])


def nested_once(x, y, groups, seed: int, targets: list[float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Outer-fold probabilities of the refits, and each rule's labels (one rule per outer fold)."""
    outer_probs = np.zeros((len(y), len(CLASSES)))
    labels = {
        "fixed": np.zeros(len(y), dtype=int),
        **{f"weights@{t}": np.zeros(len(y), dtype=int) for t in targets},
    }
    for k, (rest, test) in enumerate(_folds(y, groups, seed)):
        inner = np.zeros((len(rest), len(CLASSES)))
        for tr, va in _folds(y[rest], groups[rest], seed):
            inner[va] = _fold_probs(x, y, rest[tr], rest[va], seed)
        outer_probs[test] = _fold_probs(x, y, rest, test, seed)
        labels["fixed"][test] = RULE.labels(outer_probs[test])
        for t in targets:
            rule: DecisionRule = choose_class_weights(y[rest], inner, POOR, t)
            labels[f"weights@{t}"][test] = rule.labels(outer_probs[test])
            print(f"  seed {seed} outer {k}: target {t} weights {rule.class_weights()}")
    return outer_probs, labels


def summary(y: np.ndarray, probs: np.ndarray, predicted: np.ndarray, groups: np.ndarray) -> dict[str, object]:
    m = multiclass_metrics(y, probs, predicted, CLASSES, ordinal=True, groups=groups)
    poor_as_good = int(((predicted == 0) & (y == POOR)).sum())
    return {
        "macro_recall": m["balanced_accuracy"],
        **{f"{c.lower()}_recall": m["per_class"][c]["recall"] for c in CLASSES},
        "poor_called_good": poor_as_good,
        "two_step_count": poor_as_good + int(((predicted == POOR) & (y == 0)).sum()),
    }


def main() -> None:
    p = sleeper_parser(__doc__)
    p.add_argument("--targets", default="0.95,0.99", help="Poor recall targets of the chosen weights")
    args = p.parse_args()
    print(machine_info())
    x, y, groups = load_sleepers(args.features, args.variant)
    targets = [float(t) for t in args.targets.split(",")]
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        probs, labels = nested_once(x, y, groups, seed, targets)
        for rule, predicted in labels.items():
            row = summary(y, probs, predicted, groups)
            results[f"{rule}/seed{seed}"] = row
            cells = "  ".join(
                f"{k} {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
                for k, v in row.items()
                if isinstance(v, dict)
            )
            print(f"{rule:13s} seed {seed}: {cells}  Poor->Good {row['poor_called_good']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()

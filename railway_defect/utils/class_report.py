"""The K-class part of a report (three classes or more): the K x K confusion matrix, per-class and
macro figures with intervals at the model's decision rule and at the plain argmax, the expected
cost under a cost matrix, and for ordered classes the errors by distance. evaluate, the locked
Test split and the out-of-fold summaries share it; binary models keep their positive-class report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from railway_defect.utils.decision import DecisionRule
from railway_defect.utils.markdown import md_table
from railway_defect.utils.metrics import expected_cost, multiclass_metrics


def photo_groups(samples: Sequence[Any]) -> np.ndarray | None:
    """Each sample's photo group, for intervals that resample whole groups; None if one has none."""
    groups = [getattr(s, "group", None) for s in samples]
    return np.array(groups) if groups and all(groups) else None


def class_report(
    class_names: Sequence[str],
    ordinal: bool,
    rule: DecisionRule,
    targets: np.ndarray,
    probs: np.ndarray,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """None for two classes; else the metrics at `rule` and at the argmax (what the rule changes);
    `groups`: the photo group of each image, resampled whole for the intervals."""
    names = list(class_names)
    if len(names) <= 2:
        return None
    settings = dict(confidence=confidence, resamples=resamples, seed=seed, groups=groups)
    predicted = rule.labels(probs)
    block = labelled_report(names, ordinal, rule.describe(names), targets, probs, predicted, **settings)
    if rule.costs is not None:
        block["expected_cost"] = {
            "at_rule": expected_cost(targets, predicted, rule.costs, **settings),
            "argmax": expected_cost(targets, probs.argmax(axis=1), rule.costs, **settings),
        }
    return block


def labelled_report(
    class_names: list[str],
    ordinal: bool,
    rule: str,
    targets: np.ndarray,
    probs: np.ndarray,
    predicted: np.ndarray,
    **settings: Any,
) -> dict[str, Any]:
    """The K-class block of labels already decided (`predicted`, by the rule described as `rule`):
    nested CV decides each outer fold by its own rule. `settings`: multiclass_metrics' intervals."""
    block: dict[str, Any] = {
        "rule": rule,
        "at_rule": multiclass_metrics(targets, probs, predicted, class_names, ordinal=ordinal, **settings),
        "argmax": multiclass_metrics(
            targets, probs, probs.argmax(axis=1), class_names, ordinal=ordinal, **settings
        ),
    }
    if ordinal:
        most, least = len(class_names) - 1, 0
        block["worst_miss"] = {
            "true": class_names[most],
            "predicted": class_names[least],
            "count": int(np.sum((targets == most) & (predicted == least))),
            "of": int(np.sum(targets == most)),
        }
    return block


def format_interval(metric: dict[str, Any]) -> str:
    """`value [low, high]`, or n/a where the metric is undefined."""
    if metric.get("value") is None:
        return "n/a"
    return f"{metric['value']:.3f} [{metric['low']:.3f}, {metric['high']:.3f}]"


_fmt = format_interval


def _confusion_rows(matrix: dict[str, Any]) -> list[str]:
    labels = matrix["labels"]
    rows = [
        [label, *(f"{n} ({share:.0%})" for n, share in zip(counts, shares, strict=True))]
        for label, counts, shares in zip(labels, matrix["matrix"], matrix["row_normalised"], strict=True)
    ]
    return md_table(["true \\ predicted", *labels], rows)


def _per_class_rows(metrics: dict[str, Any]) -> list[str]:
    rows = [
        [
            c,
            str(m["support"]),
            _fmt(m["precision"]),
            _fmt(m["recall"]),
            _fmt(m["f1"]),
            _fmt(m["auroc"]),
        ]
        for c, m in metrics["per_class"].items()
    ]
    for average in ("macro", "weighted"):
        figures = metrics[average]
        auroc = _fmt(metrics["auroc_macro"]) if average == "macro" else ""
        rows.append(
            [
                f"*{average}*",
                str(metrics["n"]),
                *(_fmt(figures[k]) for k in ("precision", "recall", "f1")),
                auroc,
            ]
        )
    return md_table(["class", "n", "precision", "recall", "F1", "AUROC (one vs rest)"], rows)


def _ordinal_lines(metrics: dict[str, Any], worst: dict[str, Any]) -> list[str]:
    o = metrics["ordinal"]
    steps = ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in o["by_distance"].items())
    return [
        f"Ordered classes: mean absolute class error {_fmt(o['mean_absolute_error'])}; errors by distance: "
        f"{steps}; called less severe than they are {_fmt(o['under_called'])}, more severe "
        f"{_fmt(o['over_called'])}. {worst['true']} called {worst['predicted']}: {worst['count']} of "
        f"{worst['of']}.",
        "",
    ]


def class_markdown(block: dict[str, Any] | None, title: str = "Classes") -> list[str]:
    """The block as a section of evaluation.md (nothing for binary models)."""
    if block is None:
        return []
    rule, argmax = block["at_rule"], block["argmax"]
    lines = [
        f"## {title}",
        "",
        f"Decision rule: {block['rule']}. Balanced accuracy (macro recall) "
        f"{_fmt(rule['balanced_accuracy'])}, accuracy {_fmt(rule['accuracy'])}; at the plain argmax "
        f"{_fmt(argmax['balanced_accuracy'])}. 95% intervals: {rule['accuracy']['method']}.",
        "",
        *_confusion_rows(rule["confusion_matrix"]),
        "",
        *_per_class_rows(rule),
        "",
    ]
    if "expected_cost" in block:
        cost = block["expected_cost"]
        lines += [
            f"Mean cost per photo: {_fmt(cost['at_rule'])} at the rule, {_fmt(cost['argmax'])} at the "
            "argmax.",
            "",
        ]
    if "ordinal" in rule:
        lines += _ordinal_lines(rule, block["worst_miss"])
    return lines

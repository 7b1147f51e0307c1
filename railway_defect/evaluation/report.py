"""run_evaluation: score the validation split and the split under test with a checkpoint, fit the
temperature and the operating threshold on validation, report metrics with intervals, calibration
and figures (evaluation.json, evaluation.md), and store threshold and temperature with the model."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import rich
from rich.table import Table

from railway_defect.data.audit import audit_and_warn, audit_summary
from railway_defect.data.discovery import SPLIT_ALIASES, DatasetIndex, Sample, discover
from railway_defect.data.labels import read_labels
from railway_defect.data.splits import SPLITS_FILE, read_split_record
from railway_defect.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    plot_reliability,
    reliability_bins,
    softmax,
)
from railway_defect.evaluation.locked_test import evaluate_locked_test, locked_test_split
from railway_defect.evaluation.out_of_fold import evaluate_out_of_fold
from railway_defect.evaluation.predictions import write_predictions
from railway_defect.inference.model import (
    Calibration,
    EnsemblePredictor,
    Predictor,
    load_predictor,
    write_calibration,
)
from railway_defect.inference.scoring import score_samples
from railway_defect.utils.class_report import class_markdown, class_report, photo_groups
from railway_defect.utils.class_report import format_interval as _fmt
from railway_defect.utils.decision import Costs, DecisionRule, check_costs, threshold_for_costs
from railway_defect.utils.errors import UserError
from railway_defect.utils.layout import run_dir_of
from railway_defect.utils.markdown import md_table
from railway_defect.utils.metrics import binary_metrics, choose_threshold, negative_label
from railway_defect.utils.outputs import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

SPLIT_TITLES = {"train": "Train", "val": "Validation", "test": "Test"}
REPORTED = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auroc")


def _split_key(split: str | None, available: dict[str, list[Sample]]) -> str:
    if split is None:
        return "test" if available.get("test") else "val"
    key = SPLIT_ALIASES.get(str(split).strip().lower())
    if key is None:
        raise UserError(f"split={split} is not one of Validation, Test (or Train).")
    if not available.get(key):
        raise UserError(f"The data have no {SPLIT_TITLES[key]} split (splits: {', '.join(available)}).")
    return key


def evaluation_splits(
    splits: str, model_path: Path, root: Path, val_fraction: float, seed: int, labels: str | None = None
) -> tuple[DatasetIndex, dict[Path, str], Path | None]:
    """The images to score per split, their recorded digests and the record they came from.

    `run` (default): the splits.csv of the run the model came from, so a model is scored on its own
    validation images (its fold, its seed); `resplit`: split `root` again with `seed` and
    `val_fraction` (on purpose: the result may include training images), with the reviewed `labels`
    (data.labels) laid over the root's; else a splits.csv path."""
    if splits == "resplit":
        log.warning(
            "splits=resplit: splitting %s again with seed %s; images the model trained on may be scored.",
            root,
            seed,
        )
        overlay = read_labels(labels, root) if labels else None
        return discover(root, val_fraction, seed, labels=overlay), {}, None
    record = run_dir_of(model_path) / SPLITS_FILE if splits == "run" else Path(splits).expanduser()
    recorded, digests = read_split_record(record, root)
    log.info("Scoring the splits the run recorded in %s.", record)
    return DatasetIndex(layout=f"recorded in {record}", splits=recorded), digests, record


def _check_arguments(target_recall: float, splits: str, labels: str | None) -> None:
    if not 0.0 < target_recall <= 1.0:
        raise UserError(f"target_recall={target_recall} must be in (0, 1].")
    if labels and splits != "resplit":
        raise UserError(
            f"data.labels={labels} is read with splits=resplit only: splits={splits} scores the labels the "
            "run recorded. Add splits=resplit to split data.root again with the reviewed labels."
        )


def run_evaluation(
    ckpt_path: str | None,
    data_root: str,
    split: str | None = None,
    target_recall: float = 0.95,
    output_dir: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 42,
    splits: str = "run",
    cache_dir: str | None = None,
    batch_size: int = 32,
    ece_bins: int = 10,
    confidence: float = 0.95,
    bootstrap: int = 1000,
    store_calibration: bool = True,
    device: str = "auto",
    oof: str | None = None,
    costs: Sequence[Sequence[float]] | None = None,
    labels: str | None = None,
) -> dict[str, Any]:
    """Score a model on a split of its run's data (metrics with intervals; threshold for
    `target_recall` and temperature fitted on Validation, stored beside the model) into
    `output_dir` (default <run>/evaluation/<model>_<split>/). `ckpt_path`: checkpoint, run, CV sweep
    (an ensemble: its out-of-fold predictions) or export; `splits`: `run` (its splits.csv),
    `resplit` (`val_fraction`, `seed`) or a splits.csv; `oof`: the CV sweep of the recipe, to
    choose the threshold of a final model trained on every labelled photo; `costs`: a K x K cost
    matrix (true x predicted) whose least expected cost decides instead (binary: the threshold it
    implies); `labels`: reviewed labels (data.labels) for `resplit`. conf/evaluate.yaml."""
    _check_arguments(target_recall, splits, labels)
    predictor = load_predictor(ckpt_path, device)
    checked_costs = None if costs is None else check_costs(costs, predictor.contract.class_names)
    if oof or isinstance(predictor, EnsemblePredictor):
        return evaluate_out_of_fold(predictor, target_recall, oof, output_dir, store_calibration, bootstrap)
    root = _existing_root(data_root)
    record, locked = _locked_test(predictor, root, split, splits)
    if locked is not None:
        scoring = {"batch_size": batch_size, "cache_dir": cache_dir}
        out = _output_dir(predictor, output_dir, "test")
        return evaluate_locked_test(
            predictor, root, record, locked, out, scoring, confidence, bootstrap, seed
        )
    scored = score_splits(predictor, root, split, splits, val_fraction, seed, cache_dir, batch_size, labels)
    fitted = fit_calibration(scored, predictor.contract.positive_index, target_recall, checked_costs)
    out = _output_dir(predictor, output_dir, scored.split_key)
    written = write_outputs(predictor, root, scored, fitted, target_recall, ece_bins, out, store_calibration)
    common = _metric_settings(predictor.contract, confidence, bootstrap, seed)
    report = build_report(predictor, root, scored, fitted, target_recall, ece_bins, common, written)
    _write_report(out, report)
    return report


def _existing_root(data_root: str) -> Path:
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise UserError(f"Data folder {root} does not exist; set data.root=PATH.")
    return root


def _locked_test(
    predictor: Predictor, root: Path, split: str | None, splits: str
) -> tuple[Path, tuple[list[Sample], dict[Path, str]] | None]:
    """The run's split record, and its locked Test split when evaluate is to score that split
    (splits=run and split test or unset); None when there is none to score."""
    record = run_dir_of(predictor.path) / SPLITS_FILE
    wants_test = split is None or SPLIT_ALIASES.get(str(split).strip().lower()) == "test"
    return record, locked_test_split(record, root) if splits == "run" and wants_test else None


def _write_report(out: Path, report: dict[str, Any]) -> None:
    write_json_atomic(out / "evaluation.json", report)
    write_text_atomic(out / "evaluation.md", render_markdown(report))
    print_summary(report)


def _output_dir(predictor: Predictor, output_dir: str | None, split_key: str) -> Path:
    """`output_dir`, else <run>/evaluation/<model>_<split>/ beside the model's run."""
    if output_dir:
        return Path(output_dir)
    return run_dir_of(predictor.path) / "evaluation" / f"{predictor.path.stem}_{split_key}"


@dataclass
class Scored:
    """The logits and class indices of the Validation split and of the split under test."""

    index: DatasetIndex
    record: Path | None
    split_key: str
    val_logits: np.ndarray
    val_targets: np.ndarray
    logits: np.ndarray
    targets: np.ndarray
    samples: list[Sample]
    skipped: list[dict[str, str]]


@dataclass
class Fitted:
    """Temperature and threshold fitted on Validation, and the probabilities they give."""

    temperature: float
    threshold: float
    val_probs: np.ndarray
    probs_before: np.ndarray
    probs: np.ndarray
    positive_index: int
    # the cost matrix that decides (K classes); binary costs become `threshold`
    costs: Costs | None = None

    @property
    def rule(self) -> DecisionRule:
        return DecisionRule(self.positive_index, self.threshold, self.costs)


def score_splits(
    predictor: Predictor,
    root: Path,
    split: str | None,
    splits: str,
    val_fraction: float,
    seed: int,
    cache_dir: str | None,
    batch_size: int,
    labels: str | None = None,
) -> Scored:
    """Score the Validation split (to fit on) and the split under test (to report)."""
    index, digests, record = evaluation_splits(splits, predictor.path, root, val_fraction, seed, labels)
    split_key = _split_key(split, index.splits)
    if not index.splits.get("val") and record is not None:
        raise UserError(
            f"{record} records no Validation split (a run with data.train_on=train_and_val trained on its "
            "validation images). Choose its threshold on its recipe's cross-validation instead "
            "(oof=<CV sweep dir>), or score other labelled photos with data.root=FOLDER splits=resplit."
        )
    if not index.splits.get("val"):
        raise UserError(f"{root} has no Validation split to fit the threshold and temperature on.")
    checked = (record, digests) if record is not None else None
    val = score_samples(predictor, index.splits["val"], batch_size, cache_dir, checked)
    val_logits, val_targets, under_test = val.logits, val.targets, val
    if split_key != "val":
        under_test = score_samples(predictor, index.splits[split_key], batch_size, cache_dir, checked)
    logits, targets, samples = under_test.logits, under_test.targets, under_test.samples
    skipped = val.skipped + (under_test.skipped if under_test is not val else [])
    if targets.size == 0:
        raise UserError(f"No readable image in the {SPLIT_TITLES[split_key]} split of {root}.")
    info = predictor.contract
    if not np.any(val_targets == info.positive_index):
        raise UserError(
            f"The Validation split has no {info.positive_class!r} image to choose a threshold with."
        )
    return Scored(index, record, split_key, val_logits, val_targets, logits, targets, samples, skipped)


def fit_calibration(scored: Scored, pos: int, target_recall: float, costs: Costs | None = None) -> Fitted:
    """Temperature (NLL) on Validation; the threshold reaching `target_recall` on Validation, or
    the one binary `costs` imply (K-class costs decide themselves; the threshold then only centres
    predict's review band)."""
    temperature = fit_temperature(scored.val_logits, scored.val_targets)
    val_probs = softmax(scored.val_logits, temperature)
    if costs is not None and val_probs.shape[1] == 2:
        threshold, costs = threshold_for_costs(costs, pos), None
    else:
        threshold = choose_threshold(scored.val_targets == pos, val_probs[:, pos], target_recall)
    return Fitted(
        temperature,
        threshold,
        val_probs,
        softmax(scored.logits, 1.0),
        softmax(scored.logits, temperature),
        pos,
        costs,
    )


def _metric_settings(info: Any, confidence: float, bootstrap: int, seed: int) -> dict[str, Any]:
    return {
        "positive_class": info.positive_class,
        "negative_label": negative_label(info.class_names, info.positive_class),
        "confidence": confidence,
        "resamples": bootstrap,
        "seed": seed,
    }


def write_outputs(
    predictor: Predictor,
    root: Path,
    scored: Scored,
    fitted: Fitted,
    target_recall: float,
    bins: int,
    out: Path,
    store_calibration: bool,
) -> dict[str, Any]:
    """The reliability diagram, the per-image scores, and the calibration beside the model."""
    targets = scored.targets
    reliability = _reliability(fitted, targets, bins, out / "reliability.png")
    calibration = Calibration(
        threshold=fitted.threshold,
        temperature=fitted.temperature,
        details={
            "fitted_on": "Validation",
            "data_root": str(root),
            "target_recall": target_recall,
            "validation_images": int(scored.val_targets.size),
            "fitted_at": datetime.now().isoformat(timespec="seconds"),
        },
        costs=fitted.costs,
    )
    sidecar = None
    if store_calibration:
        sidecar = write_calibration(predictor.path, calibration, predictor.sha256, predictor.contract)
    name = f"predictions_{SPLIT_TITLES[scored.split_key].lower()}.csv"
    predictions = write_predictions(out / name, scored.samples, fitted.probs, fitted.rule, predictor.contract)
    return {
        **reliability,
        "calibration_file": str(sidecar) if sidecar else None,
        "predictions": str(predictions),
        "output_dir": str(out),
    }


def _reliability(fitted: Fitted, targets: np.ndarray, bins: int, figure: Path) -> dict[str, Any]:
    """Expected calibration error and reliability bins before and after temperature scaling,
    drawn to `figure`."""
    ece_before = expected_calibration_error(fitted.probs_before, targets, bins)
    ece_after = expected_calibration_error(fitted.probs, targets, bins)
    before = reliability_bins(fitted.probs_before, targets, bins)
    after = reliability_bins(fitted.probs, targets, bins)
    curves = {
        "before temperature scaling": (before, ece_before),
        f"after (T = {fitted.temperature:.2f})": (after, ece_after),
    }
    plot_reliability(curves, figure)
    return {
        "ece_before": ece_before,
        "ece_after": ece_after,
        "reliability": {"before": before, "after": after},
    }


def _data_block(root: Path, scored: Scored, class_names: Sequence[str]) -> dict[str, Any]:
    """What was scored: where, which split of which record, how many of each class, what was skipped."""
    return {
        "root": str(root),
        "layout": scored.index.layout,
        "splits": str(scored.record) if scored.record else "resplit",
        "split": SPLIT_TITLES[scored.split_key],
        "n": int(scored.targets.size),
        "counts": {class_names[k]: v for k, v in sorted(Counter(scored.targets.tolist()).items())},
        "validation_n": int(scored.val_targets.size),
        "skipped": scored.skipped,
    }


def build_report(
    predictor: Predictor,
    root: Path,
    scored: Scored,
    fitted: Fitted,
    target_recall: float,
    bins: int,
    common: dict[str, Any],
    written: dict[str, Any],
) -> dict[str, Any]:
    """evaluation.json: what was scored, the threshold, calibration and metrics with intervals."""
    info, targets, pos = predictor.contract, scored.targets, predictor.contract.positive_index
    is_positive, scores = targets == pos, fitted.probs[:, pos]
    return {
        "model": {**predictor.describe(), "sha256": predictor.sha256, "backbone": info.backbone},
        "data": _data_block(root, scored, info.class_names),
        "confidence": common["confidence"],
        "threshold": {
            "value": fitted.threshold,
            "target_recall": target_recall,
            "chosen_on": "Validation",
            "validation": binary_metrics(
                scored.val_targets == pos, fitted.val_probs[:, pos], fitted.threshold, **common
            ),
        },
        "calibration": _calibration_block(scored, fitted, bins, written),
        "metrics": {
            "at_0.5": binary_metrics(is_positive, scores, 0.5, **common),
            "at_threshold": binary_metrics(is_positive, scores, fitted.threshold, **common),
        },
        "decision_rule": fitted.rule.describe(info.class_names),
        "classes": class_report(
            info.class_names,
            info.ordinal,
            fitted.rule,
            targets,
            fitted.probs,
            common["confidence"],
            common["resamples"],
            common["seed"],
            photo_groups(scored.samples),
        ),
        "calibration_file": written["calibration_file"],
        "figures": {"reliability": "reliability.png"},
        "predictions": written["predictions"],
        "output_dir": written["output_dir"],
        # on the images scored here
        "shortcut_audit": audit_and_warn(scored.samples, root, predictor.contract.harmonize),
    }


def _calibration_block(scored: Scored, fitted: Fitted, bins: int, written: dict[str, Any]) -> dict[str, Any]:
    """The temperature fitted on Validation and the calibration error before and after it."""
    return {
        "temperature": fitted.temperature,
        "fitted_on": "Validation",
        "bins": bins,
        "ece_before": written["ece_before"],
        "ece_after": written["ece_after"],
        "in_sample": scored.split_key == "val",
        "reliability": written["reliability"],
    }


def _metric_table(report: dict[str, Any]) -> list[str]:
    m05, mt = report["metrics"]["at_0.5"], report["metrics"]["at_threshold"]
    positive = report["model"]["positive_class"]
    header = [f"metric ({positive})", "at 0.5", f"at threshold {mt['threshold']:.3f}"]
    return md_table(
        header,
        [[name.replace("_", " "), _fmt(m05[name]), _fmt(mt[name])] for name in REPORTED],
    )


def _confusion(block: dict[str, Any]) -> list[str]:
    cm = block["confusion_matrix"]
    (tp, fn), (fp, tn) = cm["matrix"]
    pos, neg = cm["labels"]
    return md_table(["true \\ predicted", pos, neg], [[pos, str(tp), str(fn)], [neg, str(fp), str(tn)]])


def render_markdown(report: dict[str, Any]) -> str:
    data, thr, cal = report["data"], report["threshold"], report["calibration"]
    level = round(report["confidence"] * 100)
    val_recall = thr["validation"]["recall"]
    lines = [
        f"# Evaluation of {Path(report['model']['model_path']).name} on {data['split']}",
        "",
        f"- model: `{report['model']['model_path']}` (sha256 `{report['model']['sha256'][:16]}`)",
        f"- data: `{data['root']}`, {data['split']} split, {data['n']} images "
        f"({', '.join(f'{k}: {v}' for k, v in data['counts'].items())})"
        + (f", {len(data['skipped'])} unreadable skipped" if data["skipped"] else ""),
        f"- {audit_summary(report.get('shortcut_audit'))}",
        f"- intervals: {level}% (Wilson for accuracy, precision, recall, specificity; "
        "stratified bootstrap for balanced accuracy, F1, AUROC)",
        "",
        "## Operating threshold",
        "",
        f"Chosen on Validation ({data['validation_n']} images): the best precision with recall of "
        f"{report['model']['positive_class']} >= {thr['target_recall']}. Threshold **{thr['value']:.4f}** "
        f"gives validation recall {_fmt(val_recall)} and precision {_fmt(thr['validation']['precision'])}.",
        "",
        *_metric_table(report),
        "",
        f"Confusion matrix at the threshold ({thr['value']:.3f}):",
        "",
        *_confusion(report["metrics"]["at_threshold"]),
        "",
        "Confusion matrix at 0.5:",
        "",
        *_confusion(report["metrics"]["at_0.5"]),
        "",
        *class_markdown(report.get("classes")),
        "## Calibration",
        "",
        f"Temperature scaling fitted on Validation: T = {cal['temperature']:.3f}, one for all classes. "
        f"Expected calibration error (top label, {cal['bins']} bins) on {data['split']}: "
        f"{cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after."
        + (" (In-sample: the temperature was fitted on these images.)" if cal["in_sample"] else ""),
        "",
        "![reliability diagram](reliability.png)",
        "",
    ]
    if report["calibration_file"]:
        lines += [
            f"Threshold and temperature are stored in `{report['calibration_file']}` "
            "(used by predict, serve and export).",
            "",
        ]
    return "\n".join(lines)


def print_summary(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['data']['split']}: {report['data']['n']} images", show_header=True)
    table.add_column(f"metric ({report['model']['positive_class']})")
    table.add_column("at 0.5", justify="right")
    table.add_column(f"at {report['threshold']['value']:.3f}", justify="right")
    for name in REPORTED:
        table.add_row(
            name,
            _fmt(report["metrics"]["at_0.5"][name]),
            _fmt(report["metrics"]["at_threshold"][name]),
        )
    rich.print(table)
    cal = report["calibration"]
    console = rich.get_console()
    console.print(
        f"temperature {cal['temperature']:.3f}: ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}",
        markup=False,
    )
    console.print(f"report: {report['output_dir']}/evaluation.md", soft_wrap=True, markup=False)
    if report["calibration_file"]:
        console.print(f"stored: {report['calibration_file']}", soft_wrap=True, markup=False)

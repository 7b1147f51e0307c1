"""One table for a whole sweep, built from what every job left on disk (its metrics.json and
.hydra/ overrides), so it can be rebuilt at any time, also for sweeps that were interrupted.

Writes summary.csv (one row per job), summary.md (the same table, plus mean ± std per
configuration when jobs differ only by `seed` and/or `data.fold`) and summary_groups.csv (those
means), and prints the tables with rich.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from railway_defect.callbacks.predictions import PREDICTIONS_FILE, TEST_PREDICTIONS_FILE
from railway_defect.data.discovery import REFIT
from railway_defect.sweeps import label_issues, nested, oof
from railway_defect.training.record import (
    DIVERGED,
    FAILED,
    FINISHED,
    INTERRUPTED,
    RUNNING,
    RunRecord,
)
from railway_defect.utils.decision import DecisionRule
from railway_defect.utils.errors import UserError
from railway_defect.utils.layout import has_record, job_dirs
from railway_defect.utils.markdown import md_table
from railway_defect.utils.outputs import write_text_atomic

DEFAULT_OPTIMIZED_METRIC = "val/balanced_acc_best"
# validation metrics of best.ckpt shown for every job, beside the optimised metric
METRICS = ("val/f1", "val/balanced_acc", "val/auroc")
# overrides that only repeat a configuration: jobs differing in these alone are averaged
REPEAT_KEYS = {"seed": "seeds", "data.fold": "folds", "data.outer_fold": "outer folds"}
# metrics.json status -> summary status
STATUS = {FINISHED: "ok", FAILED: "failed", DIVERGED: "diverged", INTERRUPTED: "interrupted"}
INCOMPLETE = "incomplete"
# console width for the tables when the output is not a terminal
LOG_WIDTH = 200


@dataclass
class JobRow:
    job: str
    run_dir: Path
    overrides: list[str]
    status: str
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    optimized_metric: str | None = None
    best_epoch: int | None = None
    duration_s: float | None = None
    checkpoint: str | None = None
    # the final epoch's weights (last.ckpt): what the job's out-of-fold predictions came from
    final_checkpoint: str | None = None
    # the job's `data` config (.hydra/config.yaml): its folds and outer fold
    data: dict[str, Any] = field(default_factory=dict)
    # the recipe's own threshold (model.decision_threshold): the rule its models ship with
    decision_threshold: float = 0.5

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, metric: str) -> float | None:
        value = self.metrics.get(metric)
        return None if value is None or math.isnan(value) else value


@dataclass
class GroupRow:
    """Jobs of one configuration that differ only in REPEAT_KEYS."""

    configuration: list[str]
    over: str
    jobs: list[JobRow]

    def stats(self, metric: str) -> tuple[float, float] | None:
        values = [v for job in self.jobs if job.ok and (v := job.value(metric)) is not None]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class Summary:
    sweep_dir: Path
    rows: list[JobRow]
    groups: list[GroupRow]
    optimized_metric: str
    minimize: bool
    common_overrides: list[str]
    # cross-validation configurations: pooled out-of-fold estimates (per outer fold in nested CV)
    out_of_fold: list[oof.OutOfFold] = field(default_factory=list)
    # nested cross-validation: the selection-aware outer-fold estimates
    nested: list[nested.NestedEstimate] = field(default_factory=list)
    # the photos whose label those predictions doubt most
    label_audit: label_issues.LabelAudit | None = None

    @property
    def columns(self) -> list[str]:
        return [self.optimized_metric, *(m for m in METRICS if m != self.optimized_metric)]

    @property
    def not_ok(self) -> list[JobRow]:
        return [row for row in self.rows if not row.ok]


# ---- reading job directories -----------------------------------------------------------------
def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def read_job(job_dir: Path) -> JobRow:
    overrides = _read_yaml(job_dir / ".hydra" / "overrides.yaml")
    config = _read_yaml(job_dir / ".hydra" / "config.yaml") or {}
    row = JobRow(
        job=job_dir.name,
        run_dir=job_dir,
        overrides=[str(o) for o in overrides or []],
        status=INCOMPLETE,
        data=config.get("data") or {},
        decision_threshold=float((config.get("model") or {}).get("decision_threshold", 0.5)),
    )
    if not has_record(job_dir):
        row.error = "no metrics.json: the job stopped before training started"
        return row
    try:
        record = RunRecord.read(job_dir)
    except UserError as e:
        row.error = str(e)
        return row
    row.status = STATUS.get(record.status, INCOMPLETE)
    if record.status == RUNNING:
        row.error = "metrics.json still says running: the job was killed (or is still running)"
    row.error = _one_line(record.error or row.error)
    row.optimized_metric = record.optimized_metric_name
    row.metrics = record.final_metrics()
    row.best_epoch = record.best_epoch
    row.duration_s = record.duration_s
    row.checkpoint = record.best_checkpoint
    row.final_checkpoint = record.checkpoints.get("last")
    return row


# ---- grouping and ordering -----------------------------------------------------------------
def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def recipe_key(row: JobRow) -> tuple[str, ...]:
    return tuple(sorted(o for o in row.overrides if _key(o) not in REPEAT_KEYS))


def group_jobs(rows: Sequence[JobRow]) -> list[GroupRow]:
    """Configurations run more than once (several seeds and/or folds)."""
    by_config: dict[tuple[str, ...], list[JobRow]] = {}
    for row in rows:
        by_config.setdefault(recipe_key(row), []).append(row)
    groups = []
    for configuration, jobs in by_config.items():
        if len(jobs) < 2:
            continue
        varied = [name for key, name in REPEAT_KEYS.items() if len({_value(job, key) for job in jobs}) > 1]
        groups.append(GroupRow(list(configuration), " and ".join(varied) or "repeats", jobs))
    return groups


def _value(row: JobRow, key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in row.overrides if _key(o) == key and "=" in o), None)


def _sweep_settings(rows: Sequence[JobRow], optimized_metric: str | None) -> tuple[str, bool]:
    """The optimised metric and whether smaller is better (an optuna `direction: minimize`)."""
    first = rows[0].run_dir if rows else None
    config = _read_yaml(first / ".hydra" / "config.yaml") if first else None
    hydra = _read_yaml(first / ".hydra" / "hydra.yaml") if first else None
    stored = str((config or {}).get("optimized_metric") or "")
    metric = (
        optimized_metric
        or next((r.optimized_metric for r in rows if r.optimized_metric), None)
        # the job's config as saved is unresolved: an interpolation there names no metric
        or (stored if "${" not in stored else None)
        or DEFAULT_OPTIMIZED_METRIC
    )
    direction = str(((hydra or {}).get("hydra") or {}).get("sweeper", {}).get("direction", ""))
    return metric, "minimize" in direction or (not direction and lower_is_better(metric))


def lower_is_better(metric: str) -> bool:
    """A loss ranks smallest first; the classification metrics logged here rank largest first."""
    return "loss" in metric


def ranks_smallest_first(rows: Sequence[JobRow], metric: str) -> bool:
    """The order the summary would rank `metric` in: the sweep's optimised metric by its optuna
    direction, any other by `lower_is_better` (the review notebook sorts with this too)."""
    optimized, minimize = _sweep_settings(rows, None)
    return minimize if metric == optimized else lower_is_better(metric)


def summarize(sweep_dir: str | Path, optimized_metric: str | None = None) -> Summary:
    """Read every job of `sweep_dir`; rows sorted by the optimised metric, best first."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(
            f"{sweep_dir} is not a directory; pass a sweep directory (outputs/train/multiruns/<time>)."
        )
    dirs = job_dirs(sweep_dir)
    if not dirs:
        raise UserError(
            f"{sweep_dir} has no job directories (sub-folders with .hydra/ or metrics.json); pass a sweep "
            "directory such as outputs/train/multiruns/<time>."
        )
    rows = [read_job(d) for d in dirs]
    metric, minimize = _sweep_settings(rows, optimized_metric)

    def order(row: JobRow) -> tuple[int, float]:
        value = row.value(metric)
        if value is None:
            return (1, 0.0)
        return (0, value if minimize else -value)

    rows = sorted(rows, key=order)  # stable: ties and rows without a value keep the job order
    shared = set(rows[0].overrides).intersection(*(r.overrides for r in rows[1:]))
    common = [o for o in rows[0].overrides if o in shared]
    scored = out_of_fold(rows)
    estimates = nested_estimates(rows, scored)
    summary = Summary(sweep_dir, rows, group_jobs(rows), metric, minimize, common, scored, estimates)
    summary.label_audit = audit_labels(scored, estimates)
    return summary


def audit_labels(
    scored: Sequence[oof.OutOfFold], estimates: Sequence[nested.NestedEstimate]
) -> label_issues.LabelAudit | None:
    """The label audit of the first configuration's nested outer-fold scores (first seed), else
    of its pooled out-of-fold scores at their rule. Several configurations of a study each doubt
    their own photos; the first is the one a CV or nested sweep has."""
    if estimates:
        return _audit_nested(estimates[0])
    if not scored or len({tuple(r.configuration) for r in scored}) != len(scored) or _has_outer(scored):
        return None
    first = scored[0]
    paths, labels = [i.path for i in first.images], [i.label for i in first.images]
    if first.classes:
        probs = np.array([np.mean(i.class_probs, axis=0) for i in first.images])
        rule = DecisionRule(first.classes.index(first.positive_class), first.recipe_threshold)
        return label_issues.audit_classes(
            "out-of-fold", paths, labels, probs, first.classes, rule.labels(probs), first.positive_class
        )
    scores = np.array([i.score for i in first.images])
    thresholds = np.full(len(first.images), first.threshold)
    return label_issues.audit("out-of-fold", paths, labels, scores, thresholds, first.positive_class)


def _audit_nested(estimate: nested.NestedEstimate) -> label_issues.LabelAudit | None:
    """The first seed's outer-fold photos, each decided by its own outer fold's rule."""
    mine = [s for s in estimate.scores if s.seed == estimate.seeds()[0]]
    paths, labels = [s.path for s in mine], [s.label for s in mine]
    if estimate.classes:
        probs = np.array([s.probs for s in mine])
        predicted = nested.decided(estimate, mine)
        source = "nested outer-fold"
        return label_issues.audit_classes(
            source, paths, labels, probs, estimate.classes, predicted, estimate.positive_class
        )
    scores, thresholds = np.array([s.score for s in mine]), np.array([s.threshold for s in mine])
    return label_issues.audit("nested outer-fold", paths, labels, scores, thresholds, estimate.positive_class)


def _has_outer(scored: Sequence[oof.OutOfFold]) -> bool:
    """Inner out-of-fold sets of a nested sweep still missing its refits: no audit of those."""
    return any(o.startswith("data.outer_fold=") for r in scored for o in r.configuration)


def _fold(row: JobRow) -> tuple[int, int] | None:
    """(data.num_folds, data.fold) of a cross-validation fold job, else None (also for a refit)."""
    data = row.data
    if not data.get("num_folds") or data.get("fold") == REFIT:
        return None
    return int(data["num_folds"]), int(data.get("fold") or 0)


def _outer_fold(row: JobRow) -> tuple[int, int] | None:
    """(data.outer_folds, data.outer_fold) of a nested cross-validation job, else None."""
    data = row.data
    return (int(data["outer_folds"]), int(data.get("outer_fold") or 0)) if data.get("outer_folds") else None


def _oof_key(row: JobRow) -> tuple[str, ...]:
    """The configuration whose fold jobs pool into one out-of-fold set: in nested CV, one per
    outer fold (recipe_key leaves the outer fold out, as it does seeds and folds)."""
    outer = _outer_fold(row)
    return (*recipe_key(row), f"data.outer_fold={outer[1]}") if outer else recipe_key(row)


def out_of_fold(rows: Sequence[JobRow]) -> list[oof.OutOfFold]:
    """pooled_out_of_fold, each scored (intervals, strata, the recall-0.95 threshold)."""
    return [oof.score(pooled) for pooled in pooled_out_of_fold(rows)]


def nested_estimates(rows: Sequence[JobRow], scored: Sequence[oof.OutOfFold]) -> list[nested.NestedEstimate]:
    """Per recipe of a nested sweep: each outer fold's inner out-of-fold threshold (from `scored`)
    applied to its refits' outer-fold predictions."""
    inner: dict[tuple[str, ...], dict[int, oof.OutOfFold]] = {}
    refits: dict[tuple[str, ...], dict[int, list[tuple[str, Path]]]] = {}
    folds: dict[tuple[str, ...], int] = {}
    by_configuration = {tuple(r.configuration): r for r in scored}
    for row in rows:
        outer = _outer_fold(row)
        if outer is None:
            continue
        recipe, (folds[recipe_key(row)], k) = recipe_key(row), outer
        predictions = row.run_dir / TEST_PREDICTIONS_FILE
        if row.ok and row.data.get("fold") == REFIT and predictions.is_file():
            refits.setdefault(recipe, {}).setdefault(k, []).append((_value(row, "seed") or "", predictions))
        elif (result := by_configuration.get(_oof_key(row))) is not None:
            inner.setdefault(recipe, {})[k] = result
    results = [
        nested.estimate(list(recipe), inner.get(recipe, {}), refits.get(recipe, {}), count)
        for recipe, count in folds.items()
    ]
    return [r for r in results if r is not None]


def pooled_out_of_fold(rows: Sequence[JobRow]) -> list[oof.OutOfFold]:
    """Per configuration, the pooled validation predictions of its finished fold jobs, when they
    cover every fold of some seed (a part of the folds would be an estimate on a part of the data)."""
    by_config: dict[tuple[str, ...], list[JobRow]] = {}  # per outer fold, in nested CV
    folds: dict[str, tuple[int, int] | None] = {}
    for row in rows:
        folds[row.job] = _fold(row)
        if row.ok and (row.run_dir / PREDICTIONS_FILE).is_file() and folds[row.job]:
            by_config.setdefault(_oof_key(row), []).append(row)
    results = []
    for configuration, jobs in by_config.items():
        seeds = [_value(job, "seed") or "" for job in jobs]
        covered: dict[str, set[int]] = {}
        for job, seed in zip(jobs, seeds, strict=True):
            covered.setdefault(seed, set()).add(folds[job.job][1])
        complete = [s for s, got in covered.items() if len(got) == folds[jobs[0].job][0]]
        kept = [(job, seed) for job, seed in zip(jobs, seeds, strict=True) if seed in complete]
        if not kept:
            continue
        files = [job.run_dir / PREDICTIONS_FILE for job, _ in kept]
        data = jobs[0].data
        pooled = oof.pool(
            list(configuration),
            files,
            [seed for _, seed in kept],
            data.get("positive_class"),
            bool(data.get("ordinal")),
            jobs[0].decision_threshold,
        )
        if pooled is not None:
            results.append(pooled)
    return results


# ---- rendering -------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _fmt_stats(stats: tuple[float, float] | None) -> str:
    return "" if stats is None else f"{stats[0]:.4f} ± {stats[1]:.4f}"


def _status(row: JobRow) -> str:
    return f"{row.status}: {row.error}" if row.error and not row.ok else row.status


def _relative(path: str | None, base: Path) -> str:
    if not path:
        return ""
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return path


def _varying(row: JobRow, common: list[str]) -> str:
    return " ".join(o for o in row.overrides if o not in common) or "(none)"


def job_table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    header = ["job", "overrides", "status", *summary.columns, "best epoch", "duration (s)", "checkpoint"]
    body = [
        [
            row.job,
            _varying(row, summary.common_overrides),
            _status(row),
            *(_fmt(row.value(m)) for m in summary.columns),
            "" if row.best_epoch is None else str(row.best_epoch),
            "" if row.duration_s is None else f"{row.duration_s:.1f}",
            _relative(row.checkpoint, summary.sweep_dir),
        ]
        for row in summary.rows
    ]
    return header, body


def group_table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    header = ["configuration", "over", "ok / jobs", *(f"{m} (mean ± std)" for m in summary.columns)]
    body = [
        [
            " ".join(o for o in group.configuration if o not in summary.common_overrides) or "(all jobs)",
            group.over,
            f"{sum(j.ok for j in group.jobs)} / {len(group.jobs)}",
            *(_fmt_stats(group.stats(m)) for m in summary.columns),
        ]
        for group in summary.groups
    ]
    return header, body


def to_csv(summary: Summary) -> str:
    extra = sorted({k for row in summary.rows for k in row.metrics} - set(summary.columns))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "job",
            "status",
            "error",
            "overrides",
            *summary.columns,
            *extra,
            "best_epoch",
            "duration_s",
            "checkpoint",
        ]
    )
    for row in summary.rows:
        writer.writerow(
            [
                row.job,
                row.status,
                row.error,
                " ".join(row.overrides),
                *(_fmt(row.value(m)) for m in [*summary.columns, *extra]),
                "" if row.best_epoch is None else row.best_epoch,
                "" if row.duration_s is None else row.duration_s,
                row.checkpoint or "",
            ]
        )
    return out.getvalue()


def groups_to_csv(summary: Summary) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "configuration",
            "over",
            "ok",
            "jobs",
            *(f"{m}_{s}" for m in summary.columns for s in ("mean", "std")),
        ]
    )
    for group in summary.groups:
        stats = [group.stats(m) for m in summary.columns]
        writer.writerow(
            [
                " ".join(group.configuration),
                group.over,
                sum(j.ok for j in group.jobs),
                len(group.jobs),
                *(_fmt(s[i] if s else None) for s in stats for i in (0, 1)),
            ]
        )
    return out.getvalue()


def _order_note(summary: Summary) -> str:
    return f"sorted by `{summary.optimized_metric}`, {'smallest' if summary.minimize else 'largest'} first"


def to_markdown(summary: Summary) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in _status_counts(summary).items())
    lines = [
        f"# Sweep summary: {summary.sweep_dir.name}",
        "",
        f"{len(summary.rows)} jobs ({counts}); {_order_note(summary)}; metrics of each job's best.ckpt.",
    ]
    if summary.common_overrides:
        lines += ["", "Overrides of every job: `" + " ".join(summary.common_overrides) + "`"]
    lines += ["", *md_table(*job_table(summary))]
    if summary.groups:
        lines += ["", "## Mean ± std per configuration (ok jobs)", "", *md_table(*group_table(summary))]
    if summary.nested:
        lines += ["", *nested.markdown(summary.nested)]
    if summary.out_of_fold:
        lines += ["", *oof.markdown(summary.out_of_fold)]
    if summary.label_audit:
        lines += ["", *label_issues.markdown(summary.label_audit)]
    return "\n".join(lines) + "\n"


def _status_counts(summary: Summary) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in summary.rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts


def write_summary(summary: Summary) -> list[Path]:
    """summary.csv, summary.md and (when jobs repeat a configuration) summary_groups.csv."""
    paths = [summary.sweep_dir / "summary.csv", summary.sweep_dir / "summary.md"]
    write_text_atomic(paths[0], to_csv(summary))
    write_text_atomic(paths[1], to_markdown(summary))
    if summary.groups:
        paths.append(summary.sweep_dir / "summary_groups.csv")
        write_text_atomic(paths[-1], groups_to_csv(summary))
    if summary.out_of_fold:
        oof.write(summary.sweep_dir, summary.out_of_fold)
        paths += [summary.sweep_dir / oof.OOF_FILE, summary.sweep_dir / "oof.json"]
    if summary.nested:
        paths += nested.write(summary.sweep_dir, summary.nested)
    paths += label_issues.write(summary.sweep_dir, summary.label_audit)
    return paths


def print_summary(summary: Summary, console: Console | None = None) -> None:
    """The job table without the long cells (errors and checkpoints follow it, unwrapped)."""
    if console is None:  # logs and pipes get a wide table rather than rich's 80 columns
        console = Console() if sys.stdout.isatty() else Console(width=LOG_WIDTH)
    style = {"ok": "green", "failed": "red", "diverged": "red", "interrupted": "yellow", INCOMPLETE: "yellow"}
    header, body = job_table(summary)
    keep = [i for i, name in enumerate(header) if name != "checkpoint"]
    table = Table(title=f"Sweep {summary.sweep_dir}: {_order_note(summary)}", title_justify="left")
    for i in keep:
        name = header[i]
        table.add_column(
            name,
            justify="right" if name in summary.columns else "left",
            no_wrap=name != "overrides",
            overflow="fold" if name == "overrides" else "ellipsis",
        )
    for row, cells in zip(summary.rows, body, strict=True):
        table.add_row(
            *(row.status if header[i] == "status" else cells[i] for i in keep), style=style.get(row.status)
        )
    if summary.common_overrides:
        console.print(
            "overrides of every job: " + " ".join(summary.common_overrides), soft_wrap=True, markup=False
        )
    console.print(table)
    for row in summary.not_ok:
        console.print(f"job {row.job} {row.status}: {row.error}", soft_wrap=True, markup=False, style="red")
    if summary.groups:
        header, body = group_table(summary)
        groups = Table(title="Mean ± std per configuration (ok jobs)", title_justify="left")
        for name in header:
            groups.add_column(name)
        for cells in body:
            groups.add_row(*cells)
        console.print(groups)
    for result in summary.out_of_fold:
        _print_out_of_fold(console, result)
    for estimate in summary.nested:
        line = f"nested estimate (all photos): {nested.summary_line(estimate)}"
        console.print(line, soft_wrap=True, markup=False)
    best = next((row for row in summary.rows if row.ok and row.checkpoint), None)
    if best is not None:
        console.print(f"best job {best.job}: {best.checkpoint}", soft_wrap=True, markup=False)
    console.print(f"summary: {summary.sweep_dir / 'summary.md'}", soft_wrap=True, markup=False)
    console.print(f"review:  tensorboard --logdir {summary.sweep_dir}", soft_wrap=True, markup=False)


def _print_out_of_fold(console: Console, result: oof.OutOfFold) -> None:
    table = Table(
        title=f"Out-of-fold ({result.jobs} jobs): {' '.join(result.configuration) or '(defaults)'}",
        title_justify="left",
    )
    for name in ("stratum (n)", "at", *oof.SHOWN):
        table.add_column(name)
    for key, m in result.metrics.items():
        stratum, at = key.split("@")
        at = f"{result.threshold:.3f}" if at == "threshold" else at
        table.add_row(f"{stratum} ({m['n']})", at, *(oof.format_metric(m[name]) for name in oof.SHOWN))
    console.print(table)


def summarize_and_write(
    sweep_dir: str | Path, optimized_metric: str | None = None, show: bool = True
) -> Summary:
    """What both the end-of-sweep callback and `python -m railway_defect.summarize` run."""
    summary = summarize(sweep_dir, optimized_metric)
    write_summary(summary)
    if show:
        print_summary(summary)
    return summary

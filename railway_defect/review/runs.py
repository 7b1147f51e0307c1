"""What notebooks/review.ipynb shows, as plain functions: open a run or sweep dir, read its curves
from the TensorBoard event files, tabulate the runs, evaluate best.ckpt on the validation split,
and show the misclassified images with Grad-CAM. The notebook only calls these."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from railway_defect.data.splits import SPLITS_FILE, read_split_record
from railway_defect.inference.model import CheckpointPredictor, load_predictor
from railway_defect.inference.scoring import ScoredSamples, score_samples
from railway_defect.models.gradcam import gradcam_heatmaps, overlay
from railway_defect.models.module import DefectClassifier
from railway_defect.sweeps.summary import METRICS as SUMMARY_METRICS
from railway_defect.sweeps.summary import JobRow, ranks_smallest_first, read_job
from railway_defect.training.record import FINISHED, RunRecord
from railway_defect.utils.errors import UserError
from railway_defect.utils.layout import RECORD_FILE, has_record
from railway_defect.utils.paths import PROJECT_ROOT, default_output_root, is_checkout
from railway_defect.utils.plots import Tile, caption, confusion_figure, curves_figure, denormalize, tile_grid

# a checkout reviews its own outputs/ (the notebook runs in notebooks/); $RAILWAY_OUTPUT_DIR wins
OUTPUTS = Path(default_output_root(PROJECT_ROOT if is_checkout() else None)) / "train"
# what the notebook reviews when its TARGET is None (before falling back to the newest run)
REVIEW_DIR_ENV = "RAILWAY_REVIEW_DIR"
DEFAULT_SORT = "val/balanced_acc"
# timm's import of tqdm.auto asks for ipywidgets in notebooks; nothing here shows progress bars
warnings.filterwarnings("ignore", message="IProgress not found")
# epoch-level scalars: the ones a curve is drawn for (step-level train/loss and hp/ are left out)
EPOCH_TAG_PREFIXES = ("val/", "train/loss_epoch", "train/acc")


# ---- what to review ---------------------------------------------------------------------------
@dataclass
class ReviewTarget:
    """A run dir (one run) or a sweep dir (its jobs); `runs` are dirs holding a metrics.json."""

    path: Path
    kind: str
    runs: list[Path]

    def __repr__(self) -> str:
        return f"{self.kind} {self.path} ({len(self.runs)} run{'s' if len(self.runs) != 1 else ''})"


def newest_output(root: Path = OUTPUTS) -> Path:
    """The most recent run or sweep dir under outputs/train (their names are timestamps)."""
    candidates = [p for sub in ("runs", "multiruns") for p in (root / sub).glob("*") if p.is_dir()]
    if not candidates:
        raise UserError(f"No runs in {root} yet: train one (make train) or set TARGET to a run or sweep dir.")
    return max(candidates, key=lambda p: (p.name, p.stat().st_mtime))


def _resolve(path: str | Path) -> Path:
    """A path as given, else relative to the project root (the notebook runs in notebooks/)."""
    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    return path


def open_target(path: str | Path | None = None) -> ReviewTarget:
    """A run dir, or a dir whose sub-dirs are runs (a sweep, or outputs/train/runs).

    None: $RAILWAY_REVIEW_DIR when set, else the newest run or sweep under outputs/train."""
    path = path or os.environ.get(REVIEW_DIR_ENV)
    path = _resolve(path) if path else newest_output()
    if not path.is_dir():
        raise UserError(
            f"{path} is not a folder; set TARGET to a run dir (outputs/train/runs/<timestamp>) "
            "or a sweep dir (outputs/train/multiruns/<timestamp>)."
        )
    if has_record(path):
        return ReviewTarget(path, "run", [path])
    runs = sorted(
        (p.parent for p in path.glob(f"*/{RECORD_FILE}")),
        key=lambda p: (int(p.name) if p.name.isdigit() else math.inf, p.name),
    )
    if not runs:
        raise UserError(
            f"{path} holds no metrics.json, nor do its sub-folders: "
            "it is not a run or sweep dir of this project."
        )
    return ReviewTarget(path, "sweep", runs)


# ---- curves from the event files --------------------------------------------------------------
def read_scalars(run_dir: Path) -> pd.DataFrame:
    """Every scalar the run logged to TensorBoard: columns tag, step, epoch, value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = Path(run_dir) / "tensorboard"
    if not any(logdir.glob("events.out.tfevents.*")):
        raise UserError(
            f"{run_dir} has no TensorBoard event files in {logdir} (was it run with logger=csv?)."
        )
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    epoch_at = {e.step: int(e.value) for e in events.Scalars("epoch")} if "epoch" in tags else {}
    rows = [
        (tag, e.step, epoch_at.get(e.step), e.value)
        for tag in tags
        if tag != "epoch"
        for e in events.Scalars(tag)
    ]
    return pd.DataFrame(rows, columns=["tag", "step", "epoch", "value"])


def epoch_curves(run_dir: Path) -> pd.DataFrame:
    """One row per epoch, one column per epoch-level metric (val/*, train/loss_epoch, train/acc)."""
    scalars = read_scalars(run_dir)
    scalars = scalars[scalars["tag"].str.startswith(EPOCH_TAG_PREFIXES) & scalars["epoch"].notna()]
    curves = scalars.pivot_table(index="epoch", columns="tag", values="value", aggfunc="last")
    curves.index = curves.index.astype(int)
    return curves


def plot_curves(
    target: ReviewTarget, metrics: Sequence[str] = ("loss", "balanced_acc", "f1", "auroc")
) -> Figure:
    """Loss (train solid, validation dashed) and validation metrics per epoch, one line per run;
    dots mark the epoch best.ckpt comes from."""
    curves, best = {}, {}
    # a sweep's jobs that failed before logging anything (or are starting) have no curves
    runs = [r for r in target.runs if target.kind == "run" or any((r / "tensorboard").glob("events.*"))]
    for run in runs or target.runs[:1]:
        name = run.name if target.kind == "sweep" else "run"
        curves[name] = epoch_curves(run)
        best[name] = RunRecord.read(run).best_epoch
    return curves_figure(curves, metrics, best)


# ---- the runs of a sweep ----------------------------------------------------------------------
def _runs_frame(runs: Sequence[Path]) -> tuple[pd.DataFrame, list[JobRow]]:
    """One row per run, read by the sweep summary's reader (`read_job`), so this table and the
    sweep's summary.md/csv agree on statuses and values: the optimised metric, the summary's
    metrics, then any other metric; the checkpoint only when it is on disk here."""
    jobs = [read_job(run) for run in runs]
    optimized = [job.optimized_metric for job in jobs if job.optimized_metric]
    leading = list(dict.fromkeys([*optimized, *SUMMARY_METRICS]))
    others = sorted({name for job in jobs for name in job.metrics} - set(leading))
    rows = []
    for job in jobs:
        checkpoint = job.run_dir / "checkpoints" / "best.ckpt"
        rows.append(
            {
                "run": job.job,
                "overrides": " ".join(job.overrides),
                "status": job.status,
                "error": job.error,
                **{name: job.value(name) for name in [*leading, *others]},
                "best_epoch": job.best_epoch,
                "duration_s": job.duration_s,
                "checkpoint": str(checkpoint) if checkpoint.is_file() else None,
                "path": job.run_dir,
            }
        )
    return pd.DataFrame(rows), jobs


def _column(table: pd.DataFrame, name: str) -> str | None:
    """`name` among the table's columns, ignoring case, spaces, slashes and underscores."""

    def key(text: str) -> str:
        return "".join(ch for ch in str(text).lower() if ch.isalnum())

    return next((c for c in table.columns if key(c) == key(name)), None)


def _ranked(table: pd.DataFrame, jobs: list[JobRow], column: str) -> pd.DataFrame:
    """Best first, in the summary's order: smallest first for a loss (or a minimised optimum)."""
    smallest_first = ranks_smallest_first(jobs, column)
    return table.sort_values(column, ascending=smallest_first, na_position="last", kind="stable")


def runs_table(target: ReviewTarget, sort_by: str = DEFAULT_SORT) -> pd.DataFrame:
    """A row per run (see `_runs_frame`), best first by `sort_by`."""
    table, jobs = _runs_frame(target.runs)
    column = _column(table, sort_by)
    if column is None:
        raise UserError(
            f"Cannot sort by {sort_by!r}: the table's columns are {', '.join(map(str, table.columns))}."
        )
    return _ranked(table, jobs, column).drop(columns="path").reset_index(drop=True)


def best_run(target: ReviewTarget, sort_by: str = DEFAULT_SORT) -> Path:
    """The run whose best.ckpt ranks first by `sort_by` (the run itself for a run dir)."""
    table, jobs = _runs_frame(target.runs)
    table = table[table["checkpoint"].notna()]
    if table.empty:
        raise UserError(f"No run in {target.path} has a checkpoints/best.ckpt to evaluate.")
    column = _column(table, sort_by)
    metrics = [c for c in table.columns if "/" in str(c)]
    if column is None or column not in metrics:
        raise UserError(f"Cannot rank runs by {sort_by!r}; use one of {', '.join(metrics)}.")
    return Path(_ranked(table, jobs, column).iloc[0]["path"])


# ---- a checkpoint on the validation split -----------------------------------------------------
@dataclass
class Evaluation:
    """Predictions of one checkpoint on one split, with what is needed to draw its images."""

    run_dir: Path
    checkpoint: Path
    split: str
    root: Path
    model: DefectClassifier
    paths: list[Path]
    targets: np.ndarray
    probs: np.ndarray
    dataset: Any  # items: (normalised image tensor, target)

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def positive_index(self) -> int:
        return self.model.positive_index

    @property
    def predictions(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def table(self) -> pd.DataFrame:
        """One row per image: file, true and predicted class, p(positive) (three or more classes: p of
        each), confidence, correct."""
        names, preds = self.class_names, self.predictions
        shown = range(len(names)) if len(names) > 2 else [self.positive_index]
        return pd.DataFrame(
            {
                "file": [_relative(p, self.root) for p in self.paths],
                "true": [names[t] for t in self.targets],
                "pred": [names[p] for p in preds],
                **{f"p({names[i]})": self.probs[:, i].round(3) for i in shown},
                "confidence": self.probs.max(axis=1).round(3),
                "correct": preds == self.targets,
            }
        )

    def errors(self) -> pd.DataFrame:
        """The misclassified images, most confident first."""
        table = self.table()
        return table[~table["correct"]].sort_values("confidence", ascending=False, kind="stable")


def _run_data_root(run_dir: Path, data_root: str | Path | None) -> Path:
    """The run's data folder (from its reports), or `data_root`."""
    report_path = run_dir / "data_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    root = data_root or report.get("root") or RunRecord.read(run_dir).data.get("root")
    if not root or not Path(root).expanduser().is_dir():
        raise UserError(
            f"The data of this run ({root or 'not recorded'}) is not here; "
            "pass data_root=FOLDER to evaluate_checkpoint."
        )
    return Path(root).expanduser()


class _Inputs:
    """The scored samples as the model saw them: (normalised image tensor, target) per index."""

    def __init__(self, predictor: CheckpointPredictor, scored: ScoredSamples):
        self.predictor, self.scored = predictor, scored

    def __len__(self) -> int:
        return len(self.scored.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.scored.samples[index]
        batch = self.predictor.preprocess([self.scored.images[sample.path]])
        return torch.from_numpy(batch[0]), int(self.scored.targets[index])


def evaluate_checkpoint(
    run_dir: str | Path, checkpoint: str = "best", split: str = "val", data_root: str | Path | None = None
) -> Evaluation:
    """Score `split` of the run's own recorded splits with checkpoints/<checkpoint>.ckpt on the CPU,
    the way evaluate scores it (inference.scoring), with the checkpoint's contract alone."""
    run_dir = _resolve(run_dir)
    ckpt = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
    if not ckpt.is_file():
        raise UserError(
            f"{ckpt} does not exist; pick a run with checkpoints (see runs_table) or checkpoint='last'."
        )
    root = _run_data_root(run_dir, data_root)
    # the run's own splits (its fold, its seed), never a new split that may hold training images
    splits, digests = read_split_record(run_dir / SPLITS_FILE, root)
    available = [s for s in ("val", "test") if splits.get(s)]
    if split not in available:
        raise UserError(
            f"split={split!r} is not available here; use one of {', '.join(available) or 'none'} "
            "(a run with data.train_on=train_and_val has no validation split)."
        )
    predictor = load_predictor(ckpt, device="cpu")
    scored = score_samples(predictor, splits[split], record=(run_dir / SPLITS_FILE, digests))
    paths = [s.path for s in scored.samples]
    inputs = _Inputs(predictor, scored)
    model = predictor.model
    return Evaluation(
        run_dir, ckpt, split, root, model, paths, scored.targets, scored.probabilities(), inputs
    )


def plot_confusion(evaluation: Evaluation) -> Figure:
    ev = evaluation
    title = f"{ev.run_dir.name}: {ev.checkpoint.name} on the {ev.split} split ({len(ev.targets)} images)"
    return confusion_figure(ev.targets, ev.predictions, ev.class_names, title)


def plot_misclassified(evaluation: Evaluation, limit: int = 12, columns: int = 6) -> Figure:
    """Each misclassified image (most confident first) beside the Grad-CAM of the class it was called."""
    ev = evaluation
    errors = ev.errors().head(limit)
    if errors.empty:
        fig = Figure(figsize=(6, 1.2), dpi=90)
        ax = fig.subplots()  # a figure without axes is not displayed by notebooks
        ax.text(0.5, 0.5, f"No misclassified images in the {ev.split} split.", ha="center", va="center")
        ax.set_axis_off()
        return fig
    indices = list(errors.index)
    images = torch.stack([ev.dataset[i][0] for i in indices])
    preds = [int(ev.predictions[i]) for i in indices]
    heatmaps = gradcam_heatmaps(ev.model, images, preds)
    pixels = denormalize(images, ev.model.mean, ev.model.std)
    tiles = []
    for i, pred, image, heat in zip(indices, preds, pixels, heatmaps, strict=True):
        text = caption(
            ev.class_names, int(ev.targets[i]), pred, float(ev.probs[i, ev.positive_index]), ev.positive_index
        )
        tiles.append(Tile(image, f"{_short(ev.paths[i].name)}\n{text}", wrong=True))
        tiles.append(Tile(overlay(image, heat), f"Grad-CAM for\n{ev.class_names[pred]}", wrong=True))
    title = (
        f"misclassified ({len(ev.errors())} of {len(ev.targets)}), most confident first, "
        "each beside its Grad-CAM"
    )
    return tile_grid(tiles, columns, title, inches=2.2)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _short(name: str, width: int = 26) -> str:
    return name if len(name) <= width else name[: width - 9] + "…" + name[-8:]


# ---- what next --------------------------------------------------------------------------------
def next_steps(target: ReviewTarget, evaluation: Evaluation | None = None) -> str:
    """A few observations drawn from the numbers, as a Markdown list; the reading is left to you."""
    run = evaluation.run_dir if evaluation else best_run(target)
    notes = _run_notes(run, RunRecord.read(run))
    if evaluation is not None:
        notes += _evaluation_notes(evaluation)
    if target.kind == "sweep" and len(target.runs) > 1:
        table, _ = _runs_frame(target.runs)
        if DEFAULT_SORT in table and table[DEFAULT_SORT].notna().any():
            spread = table[DEFAULT_SORT].max() - table[DEFAULT_SORT].min()
            notes.append(f"Across the {len(table)} runs `{DEFAULT_SORT}` spans {spread:.3f}.")
    notes.append(
        "In the Grad-CAM images: heat on the rail, weld or fastener is what you want; heat on ballast, "
        "sleepers' edges or the sky means the model learned a shortcut: collect more varied photos or crop."
    )
    return "\n".join(f"- {note}" for note in notes)


def _run_notes(run: Path, record: RunRecord) -> list[str]:
    """What the run record says: unfinished, random weights, best epoch last, loss rising after."""
    notes: list[str] = []
    if record.status != FINISHED:
        notes.append(f"Run `{run.name}` is **{record.status}**: its numbers describe a partial run.")
    if record.pretrained_loaded is False:
        notes.append(
            "The backbone started from **random weights**: put the ImageNet weights in the torch hub cache, "
            "or use `model=efficientnet_lite0`, before judging the recipe."
        )
    history, best_epoch = record.history, record.best_epoch
    if not history or best_epoch is None:
        return notes
    last = history[-1]["epoch"]
    if best_epoch == last:
        notes.append(
            f"The best epoch is the last one ({last}): the model may still improve with more "
            "`trainer.max_epochs`."
        )
    losses = [row.get("val/loss") for row in history if row["epoch"] >= best_epoch]
    if len(losses) > 2 and None not in losses and losses[-1] > 1.2 * losses[0]:
        notes.append(
            f"Validation loss rose by {losses[-1] / losses[0] - 1:.0%} after the best epoch "
            f"({best_epoch}): overfitting; try `augmentation=strong`, fewer epochs "
            "or a lower `optimizer.lr`."
        )
    return notes


def _evaluation_notes(ev: Evaluation) -> list[str]:
    """What the split's predictions say: misses against false alarms, and how small the split is."""
    pos = ev.positive_index
    positive = ev.class_names[pos]
    is_pos, pred_pos = ev.targets == pos, ev.predictions == pos
    missed, false_alarms = int((is_pos & ~pred_pos).sum()), int((~is_pos & pred_pos).sum())
    notes = [
        f"On the {ev.split} split ({len(ev.targets)} images): {missed} of {int(is_pos.sum())} "
        f"`{positive}` missed, {false_alarms} of {int((~is_pos).sum())} others flagged as `{positive}`."
    ]
    if len(ev.class_names) > 2:
        recall = {
            c: float(np.mean(ev.predictions[ev.targets == i] == i))
            for i, c in enumerate(ev.class_names)
            if (ev.targets == i).any()
        }
        weakest = min(recall, key=recall.get)
        listed = ", ".join(f"`{c}` {r:.2f}" for c, r in recall.items())
        notes.append(f"Recall per class (argmax): {listed}; the weakest is `{weakest}`.")
    if missed > false_alarms:
        notes.append(
            f"Missed `{positive}` images cost most in inspection: compare `data.balance=sampler` or "
            "`data.balance=loss`, and look at what the missed ones have in common above."
        )
    if len(ev.targets) < 100:
        notes.append(
            f"With {len(ev.targets)} validation images one image moves accuracy by "
            f"{1 / len(ev.targets):.1%}: differences between runs smaller than that are noise."
        )
    return notes

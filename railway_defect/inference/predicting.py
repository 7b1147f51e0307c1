"""Score inputs in batches and turn probabilities into rows (CSV for predict, JSON for serve):
the positive class's probability, the label at the operating threshold, and a review flag."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from railway_defect.data.device import EncodedImage, UndecodableOnDevice
from railway_defect.data.images import DecodeError
from railway_defect.inference.inputs import (
    InputItem,
    batched,
    estimated_frames,
    iter_inputs,
    list_sources,
)
from railway_defect.inference.model import CheckpointPredictor, Predictor, load_predictor
from railway_defect.models.contract import ModelContract
from railway_defect.utils.decision import Costs, DecisionRule, top_classes
from railway_defect.utils.errors import UserError
from railway_defect.utils.outputs import atomic_path

log = logging.getLogger(__name__)

FLIP_AXES = {"horizontal": -1, "vertical": -2}


def columns(class_names: Sequence[str], positive_class: str, top_k: int | None = None) -> list[str]:
    """Binary models: p of the positive class; K classes: p of each class and of the label; with
    `top_k`, the k likeliest classes and their p."""
    if len(class_names) == 2:
        probabilities = [f"p_{positive_class}", "label"]
    else:
        probabilities = [*(f"p_{c}" for c in class_names), "label", "p_label"]
    top = [name for i in range(1, (top_k or 0) + 1) for name in (f"top{i}", f"p_top{i}")]
    return ["path", "frame", "time_s", *probabilities, *top, "threshold", "needs_review", "error", "model"]


@dataclass(frozen=True)
class Decision:
    """How probabilities become a row: the label (a threshold on p(positive), or `costs`:
    models/decision.py), a review flag when p(positive) is in `review_band`, and the `top_k`
    likeliest classes."""

    threshold: float
    review_band: tuple[float, float]
    costs: Costs | None = None
    top_k: int | None = None

    @classmethod
    def from_config(
        cls,
        threshold: float,
        review_margin: float,
        review_band: Sequence[float] | None,
        costs: Costs | None = None,
        top_k: int | None = None,
    ) -> Decision:
        """The band is `review_band` if given, else the threshold ± `review_margin` in log-odds
        (threshold 0.5, margin 1: [0.27, 0.73]; threshold 0.14: [0.057, 0.31])."""
        if review_band is not None:
            low, high = (float(v) for v in review_band)
            if not 0.0 <= low <= high <= 1.0:
                raise UserError(f"review_band={list(review_band)} must be [low, high] within [0, 1].")
        else:
            if review_margin < 0:
                raise UserError(f"review_margin={review_margin} must not be negative.")
            t = min(max(threshold, 1e-6), 1 - 1e-6)
            logit = math.log(t / (1 - t))
            low, high = (1 / (1 + math.exp(-(logit + d))) for d in (-review_margin, review_margin))
        return cls(threshold, (round(low, 6), round(high, 6)), costs, top_k)

    @classmethod
    def for_model(
        cls,
        predictor: Predictor,
        review_margin: float,
        review_band: Sequence[float] | None,
        top_k: int | None,
    ) -> Decision:
        """The model's own rule (threshold or costs, from evaluate); `top_k` checked against its classes."""
        classes = predictor.contract.class_names
        if top_k is not None and not 1 <= top_k <= len(classes):
            raise UserError(
                f"top_k={top_k}: the model has {len(classes)} classes ({', '.join(classes)}); "
                f"use 1 to {len(classes)}, or top_k=null."
            )
        rule = predictor.rule
        return cls.from_config(rule.threshold, review_margin, review_band, rule.costs, top_k)

    def label_index(self, probs: np.ndarray, positive_index: int) -> int:
        return int(DecisionRule(positive_index, self.threshold, self.costs).labels(probs[None])[0])

    def label(self, probs: np.ndarray, class_names: Sequence[str], positive_index: int) -> str:
        """The positive class at or above the threshold, else the most likely other class (or, with
        costs, the class of least expected cost)."""
        return class_names[self.label_index(probs, positive_index)]

    def needs_review(self, p: float) -> bool:
        return self.review_band[0] <= p <= self.review_band[1]


def _probability_values(
    probs: np.ndarray | None, contract: ModelContract, decision: Decision
) -> dict[str, Any]:
    """The probability, label and top-k cells of a row (None for an item that was not scored)."""
    names, pos = contract.class_names, contract.positive_index
    label = None if probs is None else decision.label_index(probs, pos)
    cells = {"label": None if label is None else names[label]}
    if len(names) == 2:
        cells[f"p_{names[pos]}"] = None if probs is None else round(float(probs[pos]), 6)
    else:
        for i, name in enumerate(names):
            cells[f"p_{name}"] = None if probs is None else round(float(probs[i]), 6)
        cells["p_label"] = None if probs is None else round(float(probs[label]), 6)
    for rank in range(decision.top_k or 0):
        top = None if probs is None else int(top_classes(probs, decision.top_k)[rank])
        cells[f"top{rank + 1}"] = None if top is None else names[top]
        cells[f"p_top{rank + 1}"] = None if top is None else round(float(probs[top]), 6)
    return cells


def prediction_row(
    item: InputItem, probs: np.ndarray | None, predictor: Predictor, decision: Decision
) -> dict[str, Any]:
    """One row, in `columns` order, with plain Python values (None where there is no value)."""
    contract = predictor.contract
    cells = _probability_values(probs, contract, decision)
    p = None if probs is None else float(probs[contract.positive_index])
    row = {"path": item.path, "frame": item.frame, "time_s": item.time_s}
    names = columns(contract.class_names, contract.positive_class, decision.top_k)
    return {
        **row,
        **{name: cells[name] for name in names if name in cells},
        "threshold": round(decision.threshold, 6),
        "needs_review": None if p is None else decision.needs_review(p),
        "error": item.error,
        "model": predictor.model_id,
    }


def score(
    predictor: Predictor, items: list[InputItem], flips: tuple[int, ...] = ()
) -> list[np.ndarray | None]:
    """Class probabilities for each decoded item (None for items with an error), one forward pass.
    JPEG bytes the device cannot decode are decoded on the CPU instead (or get its error)."""
    decoded = [i for i, item in enumerate(items) if item.image is not None]
    result: list[np.ndarray | None] = [None] * len(items)
    if decoded:
        try:
            batch = predictor.preprocess([items[i].image for i in decoded])
        except UndecodableOnDevice as e:
            for position in e.positions:
                items[decoded[position]] = decoded_on_cpu(predictor, items[decoded[position]])
            return score(predictor, items, flips)
        for i, probs in zip(decoded, predictor.probabilities(batch, flips=flips), strict=True):
            result[i] = probs
    return result


def decoded_on_cpu(predictor: Predictor, item: InputItem) -> InputItem:
    """An item of JPEG bytes decoded by the CPU path, or with its decoding error."""
    assert isinstance(item.image, EncodedImage)
    try:
        return replace(item, image=predictor.decode_on_cpu(item.image.data.tobytes()))
    except DecodeError as e:
        return replace(item, image=None, error=str(e))


def flip_axes(tta: bool, flips: Sequence[str]) -> tuple[int, ...]:
    if not tta:
        return ()
    unknown = set(flips) - set(FLIP_AXES)
    if unknown:
        raise UserError(f"tta_flips: unknown {sorted(unknown)}; use {list(FLIP_AXES)}.")
    return tuple(FLIP_AXES[f] for f in flips)


class CsvRowWriter:
    """Rows are written (and flushed) as batches finish, to a temporary file beside `path` renamed over
    it at the end (railway_defect.utils.outputs.atomic_path). An interrupted run leaves `<path>.partial`
    with the rows done so far; a full or read-only disk leaves nothing (and `path` as it was)."""

    def __init__(self, path: Path, fieldnames: list[str]):
        self.path, self.fieldnames = path, fieldnames
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> CsvRowWriter:
        with self._stack as stack:
            self.tmp = stack.enter_context(atomic_path(self.path))
            self.file = stack.enter_context(self.tmp.open("w", newline="", encoding="utf-8"))
            self.writer = csv.DictWriter(self.file, fieldnames=self.fieldnames)
            self.writer.writeheader()
            self._stack = stack.pop_all()
        return self

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.writer.writerows([{k: _csv_value(v) for k, v in row.items()} for row in rows])
        self.file.flush()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None and not issubclass(exc_type, OSError):
            with contextlib.suppress(OSError):
                self.file.close()
                partial = self.path.with_name(self.path.name + ".partial")
                os.replace(self.tmp, partial)
                log.warning("Stopped early: the rows written so far are in %s.", partial)
        # closes the file, then renames it into place, or removes it when anything failed
        return self._stack.__exit__(exc_type, exc, tb)


def check_output_file(output: Path) -> None:
    """Refused before any work: an output that is a folder (the rename would fail at the very end)."""
    if output.is_dir():
        raise UserError(
            f"output={output} is a directory; give a file name such as {output / 'predictions.csv'}."
        )


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _gradcam_name(row_number: int, item: InputItem) -> str:
    stem = Path(item.path).stem
    frame = f"_f{item.frame}" if item.frame is not None else ""
    return f"{row_number:06d}_{stem}{frame}.jpg"


def save_gradcams(
    predictor: CheckpointPredictor,
    items: list[InputItem],
    rows: list[dict[str, Any]],
    first_row: int,
    folder: Path,
) -> None:
    """A Grad-CAM overlay of the positive class for every positive prediction of the batch."""
    import cv2
    import torch

    from railway_defect.models.gradcam import gradcam_heatmaps, overlay

    positive = predictor.contract.positive_class
    chosen = [i for i, row in enumerate(rows) if row["label"] == positive]
    if not chosen:
        return
    batch = predictor.preprocess([items[i].image for i in chosen])
    heatmaps = gradcam_heatmaps(
        predictor.network(),
        torch.from_numpy(batch).to(predictor.device),
        [predictor.contract.positive_index] * len(chosen),
    )
    folder.mkdir(parents=True, exist_ok=True)
    for i, heatmap in zip(chosen, heatmaps, strict=True):
        image = items[i].image
        heatmap = cv2.resize(heatmap, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        with atomic_path(folder / _gradcam_name(first_row + i, items[i])) as tmp:
            Image.fromarray(overlay(image, heatmap)).save(tmp, format="JPEG", quality=90)


@dataclass
class PredictionSummary:
    rows: int
    failed: int
    positives: int
    needs_review: int
    output: Path

    def add(self, rows: list[dict[str, Any]], positive_class: str) -> None:
        """Count a batch of written rows."""
        self.rows += len(rows)
        self.failed += sum(1 for r in rows if r["error"])
        self.positives += sum(1 for r in rows if r["label"] == positive_class)
        self.needs_review += sum(1 for r in rows if r["needs_review"])


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[failed]} failed"),
        console=Console(stderr=True),
        disable=not enabled,
    )


def run_prediction(
    model_path: str | None,
    input: str,
    output: str | Path,
    threshold: float | None = None,
    review_margin: float = 1.0,
    review_band: Sequence[float] | None = None,
    batch_size: int = 32,
    every_s: float = 1.0,
    tta: bool = False,
    tta_flips: Sequence[str] = ("horizontal",),
    gradcam_dir: str | Path | None = None,
    device: str = "auto",
    workers: int | None = None,
    progress: bool = True,
    top_k: int | None = None,
    decode: str = "auto",
) -> PredictionSummary:
    """Score every input of `input` into one CSV row per image or video frame (`decode`: where
    JPEGs are decoded, conf/predict.yaml; Grad-CAM overlays need the CPU's)."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}.")
    check_output_file(output := Path(output))
    sources = list_sources(input)
    predictor = load_predictor(model_path, device, threshold, "cpu" if gradcam_dir else decode)
    if gradcam_dir and not isinstance(predictor, CheckpointPredictor):
        raise UserError("gradcam_dir needs the training checkpoint (ckpt_path=...), not an exported model.")
    decision = Decision.for_model(predictor, review_margin, review_band, top_k)
    flips = flip_axes(tta, tta_flips)
    summary = PredictionSummary(0, 0, 0, 0, output)
    with (
        _progress(progress) as bar,
        CsvRowWriter(output, _columns(predictor, decision)) as writer,
    ):
        task = bar.add_task("predict", total=len(sources), failed=0)

        def on_video(path: Path) -> None:  # a video counts as its frames
            bar.update(task, total=bar.tasks[task].total + estimated_frames(path, every_s) - 1)

        for batch in batched(model_inputs(predictor, sources, every_s, workers, on_video), batch_size):
            rows = [
                prediction_row(item, probs, predictor, decision)
                for item, probs in zip(batch, score(predictor, batch, flips), strict=True)
            ]
            writer.write(rows)
            if gradcam_dir:
                save_gradcams(predictor, batch, rows, summary.rows, Path(gradcam_dir))
            summary.add(rows, predictor.contract.positive_class)
            bar.update(task, advance=len(rows), failed=summary.failed)
    return summary


def _columns(predictor: Predictor, decision: Decision) -> list[str]:
    return columns(predictor.contract.class_names, predictor.contract.positive_class, decision.top_k)


def model_inputs(
    predictor: Predictor,
    sources: Sequence[Path],
    every_s: float,
    workers: int | None = None,
    on_video: Callable[[Path], None] | None = None,
) -> Iterator[InputItem]:
    """The inputs decoded as the model's contract says (storage form, decode size)."""
    contract = predictor.contract
    return iter_inputs(
        sources,
        predictor.decode,
        contract.decode_size,
        every_s,
        workers,
        on_video=on_video,
        mode=contract.harmonize,
    )

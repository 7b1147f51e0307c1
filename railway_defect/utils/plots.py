"""Figures a reviewer looks at: captioned image grids, confusion matrices, ROC curves and training
curves. Drawn with matplotlib's object API (no pyplot state), so the same code works in a training
callback on a headless machine and in a notebook."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

WRONG = "#d62728"
RIGHT = "#2ca02c"


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (B, 3, H, W) tensors back to displayable RGB uint8 arrays (B, H, W, 3)."""
    images = images.detach().float().cpu()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (images * std_t + mean_t).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def caption(class_names: Sequence[str], true: int, pred: int, p_positive: float, positive: int) -> str:
    """`true / pred / p(positive)` on three short lines, as every grid shows it."""
    return (
        f"true: {class_names[true]}\npred: {class_names[pred]}\np({class_names[positive]}) {p_positive:.2f}"
    )


@dataclass
class Tile:
    image: np.ndarray  # RGB uint8 (H, W, 3)
    title: str
    wrong: bool = False


def tile_grid(
    tiles: Sequence[Tile], columns: int = 8, title: str | None = None, inches: float = 1.8
) -> Figure:
    """A grid of captioned images; wrong predictions get a thick red frame and a red caption."""
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    fig = Figure(
        figsize=(columns * inches, rows * (inches + 0.45) + (0.35 if title else 0)),
        dpi=80,
        layout="constrained",
    )
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for ax, tile in zip(axes, tiles, strict=False):
        ax.imshow(tile.image)
        ax.set_title(tile.title, fontsize=7, color=WRONG if tile.wrong else "black", loc="left")
        if tile.wrong:
            ax.set_frame_on(True)
            for spine in ax.spines.values():
                spine.set_color(WRONG)
                spine.set_linewidth(4)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def confusion_figure(
    targets: Sequence[int], predictions: Sequence[int], class_names: Sequence[str], title: str | None = None
) -> Figure:
    """Counts and row-normalised rates (each row: what the images of one true class were called)."""
    fig = Figure(figsize=(9.5, 4.2), dpi=90)
    axes = fig.subplots(1, 2)
    labels = list(range(len(class_names)))
    for ax, normalize, name, fmt in (
        (axes[0], None, "counts", "d"),
        (axes[1], "true", "row-normalised (recall per class)", ".2f"),
    ):
        ConfusionMatrixDisplay.from_predictions(
            targets,
            predictions,
            labels=labels,
            display_labels=list(class_names),
            normalize=normalize,
            values_format=fmt,
            cmap="Blues",
            colorbar=False,
            ax=ax,
        )
        ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def roc_figure(
    is_positive: Sequence[bool], p_positive: Sequence[float], positive_class: str, title: str | None = None
) -> Figure:
    """ROC of the positive class against the rest; a note instead when only one class is present."""
    fig = Figure(figsize=(4.6, 4.2), dpi=90)
    ax = fig.subplots()
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class in this split", ha="center", va="center")
        ax.set_axis_off()
    else:
        RocCurveDisplay.from_predictions(
            is_positive,
            np.asarray(p_positive),
            pos_label=True,
            name=positive_class,
            ax=ax,
            plot_chance_level=True,
        )
        ax.set_xlabel("false positive rate")
        ax.set_ylabel(f"true positive rate (recall of {positive_class})")
    ax.set_title(title or f"ROC: {positive_class} vs rest", fontsize=10)
    fig.tight_layout()
    return fig


def curves_figure(
    curves: dict[str, pd.DataFrame], metrics: Sequence[str], best_epochs: dict[str, int | None] | None = None
) -> Figure:
    """One panel per metric, one line per run: `loss` shows train (solid) and validation (dashed),
    other metrics their validation value; a dot marks each run's best epoch."""
    fig = Figure(figsize=(4.0 * len(metrics), 3.4), dpi=90, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for ax, metric in zip(axes, metrics, strict=True):
        for color, (name, table) in zip(colors, curves.items(), strict=True):
            pairs = (
                [("val/loss", "--", "val"), ("train/loss_epoch", "-", "train")] if metric == "loss" else []
            )
            pairs = pairs or [(f"val/{metric}", "-", "val")]
            for tag, style, stage in pairs:
                if tag not in table:
                    continue
                series = table[tag].dropna()
                label = (f"{name} {stage}" if len(curves) > 1 else stage) if metric == "loss" else name
                ax.plot(series.index, series.values, style, color=color, marker=".", label=label)
                best = (best_epochs or {}).get(name)
                if stage == "val" and best in series.index:
                    ax.plot([best], [series[best]], "o", color=color, markersize=9, alpha=0.5)
        ax.set_title(metric if metric == "loss" else f"val/{metric}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (metric == "loss" or len(curves) > 1):
            ax.legend(fontsize=7)
    return fig

"""Temperature scaling (one scalar dividing the logits, fitted by NLL on validation), expected
calibration error and the reliability diagram that shows it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch.nn import functional as F

from railway_defect.utils.outputs import atomic_path

TEMPERATURE_BOUNDS = (0.05, 20.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=1).numpy()


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T)."""
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    targets_t = torch.as_tensor(targets, dtype=torch.long)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits_t / math.exp(log_t), targets_t))

    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: the sample-weighted gap between confidence and accuracy over the very bins that
    `reliability_bins` returns, so the number in the diagram's title is the one its bars show."""
    return ece_from_bins(reliability_bins(probs, targets, bins))


def ece_from_bins(rows: list[dict[str, Any]]) -> float:
    total = sum(r["count"] for r in rows)
    if not total:
        return 0.0
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]) / total)


def reliability_bins(probs: np.ndarray, targets: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    """Per confidence bin: its range, count, mean confidence and accuracy (None when empty)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = which == b
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": int(mask.sum()),
                "confidence": float(confidence[mask].mean()) if mask.any() else None,
                "accuracy": float(correct[mask].mean()) if mask.any() else None,
            }
        )
    return rows


def plot_reliability(panels: dict[str, tuple[list[dict[str, Any]], float]], path: Path) -> None:
    """One reliability diagram per panel (title -> (bins, ECE)), side by side, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, (rows, ece)) in zip(axes[0], panels.items(), strict=True):
        filled = [r for r in rows if r["count"]]
        width = rows[0]["high"] - rows[0]["low"]
        ax.bar(
            [r["low"] for r in filled],
            [r["accuracy"] for r in filled],
            width=width,
            align="edge",
            edgecolor="black",
            color="tab:blue",
            label="accuracy",
        )
        for r in filled:
            ax.text(r["low"] + width / 2, r["accuracy"] + 0.01, f"n={r['count']}", ha="center", fontsize=7)
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.plot(
            [r["confidence"] for r in filled],
            [r["accuracy"] for r in filled],
            "o",
            color="tab:orange",
            label="mean confidence",
        )
        ax.set(
            xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{title}\nECE {ece:.3f}"
        )
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a full disk must not leave half a PNG
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

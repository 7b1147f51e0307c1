"""Ordered classes on frozen features: the framework's softmax head against an ordinal
(CORAL-style, cumulative-link) head, by repeated group-aware 5-fold cross-validation
(issue 29, STUDY.md "Sleepers").

Both heads are the recipe of experiment=sleepers, fixed before anything was scored: standardised
features (batch norm without affine), five linear heads averaged, class-weighted loss
(data.balance=loss), AdamW lr 1e-3, weight decay 0.01, 30 epochs, warmup + cosine, batch 32. The
softmax head is what the framework trains. The ordinal head gives each of its five heads one score
g and K-1 ordered cut points: p(class > k) = sigmoid(g - c_k), trained with binary cross-entropy
on each cut (CORAL, Cao et al. 2020), and the class probabilities are the differences of the
cumulative ones. Both are decided by the recipe's own rule (Poor when p(Poor) >= 0.5, else the
likelier other class), so nothing is chosen on the scores reported: the numbers are out-of-fold,
and the better of the two is a choice of one among two (mildly optimistic).

    python benchmarks/study_features.py --root ../shared/datasets/concrete-sleepers \
        --out outputs/sleeper_features --variants lite2_none384
    python benchmarks/study_ordinal.py --features outputs/sleeper_features --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from _common import machine_info, parser
from study_frozen_heads import fit_loop, groups_for, load

from railway_defect.data.discovery import _group_folds
from railway_defect.utils.decision import DecisionRule
from railway_defect.utils.metrics import multiclass_metrics

CLASSES = ("Good", "Fair", "Poor")
HEADS, EPOCHS, LR, WEIGHT_DECAY, BATCH = 5, 30, 1e-3, 0.01, 32
RULE = DecisionRule(positive_index=2, threshold=0.5)


class OrdinalHeads(torch.nn.Module):
    """`heads` scores g from shared standardised features, each with K-1 cut points."""

    def __init__(self, features: int, classes: int, heads: int):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(features, affine=False)
        self.score = torch.nn.Linear(features, heads)
        self.cuts = torch.nn.Parameter(torch.linspace(-1, 1, classes - 1).repeat(heads, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, heads, K-1) logits of p(class > k)."""
        return self.score(self.norm(x)).unsqueeze(-1) - self.cuts


def _softmax_heads(features: int, classes: int, heads: int) -> torch.nn.Module:
    norm = torch.nn.BatchNorm1d(features, affine=False)
    return torch.nn.Sequential(norm, torch.nn.Linear(features, classes * heads))


def _loss(kind: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor):
    if kind == "softmax":
        logits = model(x).unflatten(1, (HEADS, -1))
        ce = torch.nn.functional.cross_entropy
        return sum(ce(logits[:, h], y, weight=weights) for h in range(HEADS))
    logits = model(x)  # (N, heads, K-1)
    above = (y[:, None] > torch.arange(logits.shape[-1])).float()
    per = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, above[:, None, :].expand_as(logits), reduction="none"
    )
    return (per.sum(dim=(1, 2)) * weights[y]).sum() / weights[y].sum()


def fit(kind: str, x: np.ndarray, y: np.ndarray, seed: int) -> torch.nn.Module:
    """The head trained as the framework trains the recipe's (class-weighted, warmup + cosine)."""
    torch.manual_seed(seed)
    k = len(CLASSES)
    model = _softmax_heads(x.shape[1], k, HEADS) if kind == "softmax" else OrdinalHeads(x.shape[1], k, HEADS)
    counts = np.bincount(y, minlength=k)
    weights = torch.tensor(len(y) / (k * np.maximum(counts, 1)), dtype=torch.float32)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    return fit_loop(
        model,
        lambda idx: _loss(kind, model, x_t[idx], y_t[idx], weights),
        len(y),
        seed,
        EPOCHS,
        LR,
        WEIGHT_DECAY,
        BATCH,
    )


@torch.no_grad()
def probabilities(kind: str, model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """(N, K) class probabilities: the heads' mean softmax logits, or the differences of the
    heads' mean cumulative probabilities (clipped at 0 and renormalised)."""
    if kind == "softmax":
        return model(torch.from_numpy(x)).unflatten(1, (HEADS, -1)).mean(1).softmax(1).numpy()
    above = torch.sigmoid(model(torch.from_numpy(x))).mean(1).numpy()  # (N, K-1)
    cumulative = np.concatenate([np.ones((len(x), 1)), above, np.zeros((len(x), 1))], axis=1)
    probs = np.clip(cumulative[:, :-1] - cumulative[:, 1:], 0, None)
    return probs / probs.sum(axis=1, keepdims=True)


def out_of_fold(kind: str, x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    labels = [CLASSES[i] for i in y]
    probs = np.zeros((len(y), len(CLASSES)))
    for train, test in _group_folds(labels, list(groups), 5, seed):
        probs[test] = probabilities(kind, fit(kind, x[train], y[train], seed), x[test])
    return probs


def summary(y: np.ndarray, probs: np.ndarray, groups: np.ndarray) -> dict[str, object]:
    predicted = RULE.labels(probs)
    m = multiclass_metrics(y, probs, predicted, CLASSES, ordinal=True, groups=groups)
    row = {
        "macro_recall": m["balanced_accuracy"],
        "poor_recall": m["per_class"]["Poor"]["recall"],
        "fair_recall": m["per_class"]["Fair"]["recall"],
        "auroc_macro": m["auroc_macro"],
    }
    two_steps = int(((predicted == 0) & (y == 2)).sum() + ((predicted == 2) & (y == 0)).sum())
    return {**row, "ordinal": m["ordinal"], "two_step_count": two_steps}


def sleeper_parser(doc: str) -> argparse.ArgumentParser:
    """The sleeper studies' options: the feature cache, its variant, split seeds, the JSON output."""
    p = parser(doc.split("\n\n")[0])
    p.add_argument("--features", type=Path, default=Path("outputs/sleeper_features"))
    p.add_argument("--variant", default="lite2_none384", help="'+' joins features side by side")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p


def load_sleepers(features: Path, variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, class indices (CLASSES order) and the photo groups of the cached frames."""
    data = load(features, variant.split("+"))
    y = np.array([CLASSES.index(str(label)) for label in data["labels"]])
    return data["features"].astype(np.float32), y, groups_for(data, 10)


def main() -> None:
    args = sleeper_parser(__doc__).parse_args()
    print(machine_info())
    x, y, groups = load_sleepers(args.features, args.variant)
    counts = dict(zip(CLASSES, np.bincount(y).tolist(), strict=True))
    print(f"{len(y)} frames, {np.unique(groups).size} groups, classes {counts}")
    results = {}
    for kind in ("softmax", "ordinal"):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = summary(y, out_of_fold(kind, x, y, groups, seed), groups)
            results[f"{kind}/seed{seed}"] = row
            shown = {k: v for k, v in row.items() if isinstance(v, dict) and "value" in v}
            cells = "  ".join(
                f"{k} {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for k, v in shown.items()
            )
            print(f"{kind:8s} seed {seed}: {cells}  two-step errors {row['two_step_count']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()

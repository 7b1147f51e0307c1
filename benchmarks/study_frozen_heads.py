"""Nested, group-aware cross-validation of heads on frozen features (benchmarks/study_features.py):
the same head as the framework's linear probe (standardised features, `heads` linear heads each on
its own class-weighted loss, AdamW, warmup + cosine), trained in seconds, so that feature variants,
group windows and threshold rules can be compared over many split seeds. Outer folds estimate; the
inner folds of each outer training set choose the threshold (one model's recall-0.95 threshold),
exactly as experiment=nested_cv does in the framework.

    python benchmarks/study_frozen_heads.py --features outputs/study_features \
        --variants lite2_thumb260 --windows 10,60,300,day --seeds 1,2,3
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import parser
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score

from railway_defect.data.discovery import Sample, _group_folds, pooled_groups
from railway_defect.utils.metrics import choose_threshold

POSITIVE = "Defective"
TARGET_RECALL = 0.95


def load(features: Path, variants: list[str]) -> dict[str, np.ndarray]:
    """The variants' features side by side (same photos, same order)."""
    arrays = [dict(np.load(features / f"{v}.npz")) for v in variants]
    for other in arrays[1:]:
        assert (other["paths"] == arrays[0]["paths"]).all()
    return {**arrays[0], "features": np.concatenate([a["features"] for a in arrays], axis=1)}


def groups_for(data: dict[str, np.ndarray], window: float | str) -> np.ndarray:
    columns = zip(data["paths"], data["labels"], data["groups"], strict=True)
    samples = [Sample(Path(p), str(lab), str(g)) for p, lab, g in columns]
    return np.array(pooled_groups(samples, window))


def fit_loop(
    model: torch.nn.Module,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    samples: int,
    seed: int,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch: int = 32,
) -> torch.nn.Module:
    """The recipe's training of a head: AdamW, linear warmup over a tenth of the steps then cosine,
    shuffled batches (a batch of one skipped: batch norm); `loss_of(indices)` gives a batch's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(samples / batch)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(samples, generator=generator).split(batch):
            if len(idx) < 2:
                continue
            loss = loss_of(idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def train_head(
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    heads: int = 5,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch: int = 32,
) -> torch.nn.Module:
    torch.manual_seed(seed)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    model = torch.nn.Sequential(
        torch.nn.BatchNorm1d(x.shape[1], affine=False), torch.nn.Linear(x.shape[1], 2 * heads)
    )
    counts = np.bincount(y, minlength=2)
    weights = torch.tensor(len(y) / (2 * np.maximum(counts, 1)), dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        logits = model(x_t[idx]).unflatten(1, (heads, 2))
        return sum(loss_fn(logits[:, h], y_t[idx]) for h in range(heads))

    return fit_loop(model, loss_of, len(y), seed, epochs, lr, weight_decay, batch)


def scores_of(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).unflatten(1, (-1, 2)).mean(1)
    return logits.softmax(1)[:, 1].numpy()


HEAD: dict[str, float] = {}
# features of the same photos in other storage forms (--train-views): extra training rows, each
# with its photo's label; the inner and outer folds are scored in the photos' own form only
TRAIN_VIEWS: list[np.ndarray] = []


# --prune: every fit first drops the photos of its training set whose label cleanlab doubts, found
# on out-of-fold scores of that training set alone (group-aware 5 folds), then trains on the rest
PRUNE: dict[str, np.ndarray] = {}


def _train(x: np.ndarray, y: np.ndarray, idx: np.ndarray, seed: int) -> torch.nn.Module:
    if PRUNE:
        idx = idx[~doubted_labels(x, y, idx, seed)]
    rows = np.concatenate([x[idx], *(view[idx] for view in TRAIN_VIEWS)])
    return train_head(rows, np.tile(y[idx], 1 + len(TRAIN_VIEWS)), seed, **HEAD)


def doubted_labels(x: np.ndarray, y: np.ndarray, idx: np.ndarray, seed: int) -> np.ndarray:
    """A mask over `idx`: cleanlab's label issues on 5-fold group-aware out-of-fold probabilities."""
    from cleanlab.filter import find_label_issues

    groups, labels = PRUNE["groups"][idx], list(np.where(y[idx] == 1, POSITIVE, "other"))
    probs = np.zeros(len(idx))
    for tr, va in _group_folds(labels, list(groups), 5, seed):
        probs[va] = scores_of(train_head(x[idx[tr]], y[idx[tr]], seed, **HEAD), x[idx[va]])
    return find_label_issues(y[idx], np.stack([1 - probs, probs], axis=1))


def nested_once(x, y, groups, split_seed: int, train_seed: int, outer: int = 5, inner: int = 5, strata=None):
    """Outer-fold scores of the refit and the threshold its inner folds chose, for every photo
    (`strata`: a stratum per photo, each with its own threshold chosen on its inner photos)."""
    labels = list(np.where(y == 1, POSITIVE, "other"))
    score, threshold, fold_of = np.zeros(len(y)), np.zeros(len(y)), np.zeros(len(y), dtype=int)
    for k, (rest, test) in enumerate(_group_folds(labels, list(groups), outer, split_seed)):
        inner_scores = np.zeros(len(rest))
        inner_labels = [labels[i] for i in rest]
        for tr, va in _group_folds(inner_labels, list(groups[rest]), inner, split_seed):
            model = _train(x, y, rest[tr], train_seed)
            inner_scores[va] = scores_of(model, x[rest[va]])
        model = _train(x, y, rest, train_seed)
        score[test], fold_of[test] = scores_of(model, x[test]), k
        threshold[test] = choose_threshold(y[rest] == 1, inner_scores, TARGET_RECALL)
        for stratum in [] if strata is None else np.unique(strata):
            mine = strata[rest] == stratum
            if y[rest][mine].any():
                chosen = choose_threshold(y[rest][mine] == 1, inner_scores[mine], TARGET_RECALL)
                threshold[test[strata[test] == stratum]] = chosen
    return score, threshold, fold_of


def metrics(y, score, threshold, mask) -> dict[str, float]:
    y, s, t = y[mask], score[mask], threshold[mask]
    if y.all() or not y.any():
        return {"n": int(mask.sum())}
    return {
        "n": int(mask.sum()),
        "auroc": float(roc_auc_score(y, s)),
        "ba": float(balanced_accuracy_score(y, s >= t)),
        "recall": float(recall_score(y, s >= t)),
        "specificity": float(((s < t) & (y == 0)).sum() / (y == 0).sum()),
    }


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--features", type=Path, default=Path("outputs/study_features"))
    p.add_argument("--variants", default="lite2_thumb260", help="';'-separated; '+' joins features")
    p.add_argument("--windows", default="10")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--head", default="", help="train_head settings, e.g. epochs=60,lr=0.003")
    p.add_argument("--train-views", default="", help="';'-separated variants: extra training rows")
    p.add_argument(
        "--per-stratum", action="store_true", help="a threshold for the 640 squares, one for the rest"
    )
    p.add_argument("--prune", action="store_true", help="each fit drops the labels cleanlab doubts")
    args = p.parse_args()
    HEAD.update({k: float(v) for k, v in (kv.split("=") for kv in args.head.split(",") if kv)})
    for key in ("epochs", "heads", "batch"):
        if key in HEAD:
            HEAD[key] = int(HEAD[key])
    windows = [w if w == "day" else float(w) for w in args.windows.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for variant, window in itertools.product(args.variants.split(";"), windows):
        data = load(args.features, variant.split("+"))
        x, y = data["features"], (data["labels"] == POSITIVE).astype(int)
        views = [load(args.features, v.split("+")) for v in args.train_views.split(";") if v]
        assert all((view["paths"] == data["paths"]).all() for view in views)
        TRAIN_VIEWS[:] = [view["features"] for view in views]
        groups = groups_for(data, window)
        PRUNE.clear()
        if args.prune:
            PRUNE["groups"] = groups
        strata = {
            "all": np.ones(len(y), bool),
            **{s: data["sources"] == s for s in sorted(set(data["sources"]))},
        }
        per_seed = []
        for seed in seeds:
            squares = (
                np.where(data["sources"] == "roboflow-640", "square", "other") if args.per_stratum else None
            )
            score, threshold, _ = nested_once(x, y, groups, seed, seed + 100, strata=squares)
            per_seed.append({name: metrics(y, score, threshold, m) for name, m in strata.items()})
        summary = {
            name: {k: float(np.mean([r[name][k] for r in per_seed])) for k in per_seed[0][name] if k != "n"}
            for name in strata
        }
        results.append(
            {
                "variant": variant,
                "window": window,
                "groups": len(set(groups)),
                "seeds": seeds,
                "mean": summary,
                "per_seed": per_seed,
            }
        )
        cells = " | ".join(
            f"{name} BA {m.get('ba', float('nan')):.3f} R {m.get('recall', float('nan')):.3f} "
            f"AUC {m.get('auroc', float('nan')):.3f}"
            for name, m in summary.items()
        )
        print(
            f"{variant} +views[{args.train_views}] {args.head} prune={args.prune} window={window} "
            f"groups={len(set(groups))}: {cells}",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

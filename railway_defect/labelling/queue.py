"""The triage queue: what a reviewer sees, in the order that spends their time best.

Sources: a folder, glob or video (scored here by the model, as predict scores them), a
predictions.csv written by predict (its probabilities as written), or a cross-validation sweep's
label_issues.csv (the labelled photos the out-of-fold predictions doubt, cleanlab's rank).

Orders:
- `defect`: the likeliest defects first (a crew deciding what to inspect);
- `uncertain`: nearest the decision rule first (the labels that teach the model most);
- `disagreement`: where the members of a cross-validation ensemble disagree most;
- `label_issues`: cleanlab's rank of doubtful labels;
- `diverse`: k-center greedy on the model's features (farthest from everything chosen so far), so
  that one round of labelling does not spend itself on near-duplicate frames.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from railway_defect.data.label_store import Item, file_digest
from railway_defect.inference.inputs import InputItem, batched, list_sources
from railway_defect.inference.model import CheckpointPredictor, EnsemblePredictor, Predictor
from railway_defect.inference.predicting import model_inputs
from railway_defect.sweeps.label_issues import LABEL_ISSUES_FILE
from railway_defect.utils.decision import DecisionRule
from railway_defect.utils.errors import UserError

log = logging.getLogger(__name__)

ORDERS = ("defect", "uncertain", "disagreement", "label_issues", "diverse")
# features are projected to this many principal components before k-center greedy
DIVERSE_DIMENSIONS = 32


@dataclass
class Scored:
    """What the queue is built from, one entry per photo or frame (unreadable inputs left out)."""

    paths: list[str] = field(default_factory=list)
    frames: list[int | None] = field(default_factory=list)
    times: list[float | None] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    members: list[np.ndarray] = field(default_factory=list)  # per item: (M, K), the ensemble's members
    features: list[np.ndarray] = field(default_factory=list)
    given: list[str | None] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, error)

    def add(self, item: InputItem, probs: np.ndarray, given: str | None = None) -> None:
        self.paths.append(str(Path(item.path).resolve()))
        self.frames.append(item.frame)
        self.times.append(item.time_s)
        self.probs.append(probs)
        self.given.append(given)


# the orders ---------------------------------------------------------------------------------
def defect_order(probs: np.ndarray, positive_index: int) -> tuple[np.ndarray, np.ndarray]:
    scores = probs[:, positive_index]
    return np.argsort(-scores, kind="stable"), scores


def uncertainty(probs: np.ndarray, rule: DecisionRule) -> np.ndarray:
    """How far each item is from changing label (smaller: nearer): for a threshold, the distance in
    log-odds of p(positive) from it; for costs, the gap between the two least expected costs."""
    if rule.costs is not None:
        expected = np.sort(probs @ np.asarray(rule.costs), axis=1)
        return expected[:, 1] - expected[:, 0]
    p = np.clip(probs[:, rule.positive_index], 1e-6, 1 - 1e-6)
    t = min(max(rule.threshold, 1e-6), 1 - 1e-6)
    return np.abs(np.log(p / (1 - p)) - np.log(t / (1 - t)))


def uncertain_order(probs: np.ndarray, rule: DecisionRule) -> tuple[np.ndarray, np.ndarray]:
    scores = uncertainty(probs, rule)
    return np.argsort(scores, kind="stable"), scores


def disagreement_order(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """members: (N, M, K). The variance of the members' probabilities, summed over classes."""
    scores = members.var(axis=1).sum(axis=1)
    return np.argsort(-scores, kind="stable"), scores


def k_center_order(features: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-first traversal from `first`: each next item is the one farthest from all chosen so
    far; an item's score is that distance when it was chosen (how new it was then)."""
    x = _projected(features)
    n = len(x)
    order, scores = np.empty(n, dtype=int), np.empty(n)
    nearest = np.full(n, np.inf)
    chosen, distance = first, np.inf
    for step in range(n):
        order[step], scores[chosen] = chosen, distance
        nearest = np.minimum(nearest, np.linalg.norm(x - x[chosen], axis=1))
        nearest[chosen] = -1.0
        chosen = int(np.argmax(nearest))
        distance = float(nearest[chosen])
    return order, scores


def _projected(features: np.ndarray) -> np.ndarray:
    """Standardised features on their first principal components (fast distances, noise dropped)."""
    x = features - features.mean(axis=0)
    x = x / (x.std(axis=0) + 1e-6)
    k = min(DIVERSE_DIMENSIONS, *x.shape)
    if k < x.shape[1]:
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        x = x @ vt[:k].T
    return x


def ordered(order: str, scored: Scored, rule: DecisionRule) -> tuple[np.ndarray, np.ndarray]:
    """The items' positions in `order` and, per item, what the order sorted by."""
    probs = np.stack(scored.probs)
    if order == "defect":
        return defect_order(probs, rule.positive_index)
    if order == "uncertain":
        return uncertain_order(probs, rule)
    if order == "disagreement":
        return disagreement_order(np.stack(scored.members))
    if order == "diverse":
        return k_center_order(np.stack(scored.features), int(np.argmax(probs[:, rule.positive_index])))
    return np.arange(len(probs)), np.arange(1, len(probs) + 1, dtype=float)  # label_issues: cleanlab's rank


# the sources --------------------------------------------------------------------------------
def check_order(order: str, predictor: Predictor | None, source: Path) -> None:
    """Each order's needs, refused in one line before any work."""
    if order not in ORDERS:
        raise UserError(f"order={order}: use one of {', '.join(ORDERS)}.")
    if order == "disagreement" and not isinstance(predictor, EnsemblePredictor):
        raise UserError(
            "order=disagreement needs a cross-validation ensemble: ckpt_path=<the CV sweep directory>."
        )
    if order == "diverse" and not isinstance(predictor, CheckpointPredictor | EnsemblePredictor):
        raise UserError(
            "order=diverse needs the model's features: ckpt_path=<a training checkpoint or CV sweep>."
        )
    if (
        order == "label_issues"
        and not (source / LABEL_ISSUES_FILE).is_file()
        and source.name != LABEL_ISSUES_FILE
    ):
        raise UserError(
            f"order=label_issues reads a cross-validation sweep's {LABEL_ISSUES_FILE}: "
            f"input=<the sweep directory> (run `python -m railway_defect.summarize <sweep>` first)."
        )


def _feature_source(predictor: Predictor) -> CheckpointPredictor:
    return predictor.members[0] if isinstance(predictor, EnsemblePredictor) else predictor  # type: ignore[return-value]


def score_sources(
    predictor: Predictor, sources: Sequence[Path], order: str, every_s: float, batch_size: int
) -> Scored:
    """Decode and score every photo or frame, with what the order needs (members, features)."""
    scored = Scored()
    for batch in batched(model_inputs(predictor, sources, every_s), batch_size):
        readable = [item for item in batch if item.image is not None]
        scored.skipped += [(item.path, item.error) for item in batch if item.image is None]
        if not readable:
            continue
        images = predictor.preprocess([item.image for item in readable])
        for item, probs in zip(readable, predictor.probabilities(images), strict=True):
            scored.add(item, probs)
        if order == "disagreement":
            per_member = np.stack([m.probabilities(images) for m in predictor.members])  # type: ignore[attr-defined]
            scored.members += list(per_member.transpose(1, 0, 2))
        if order == "diverse":
            scored.features += list(_feature_source(predictor).features(images))
    return scored


def read_predictions_csv(
    path: Path, class_names: Sequence[str], positive_class: str, given_column: str | None = None
) -> Scored:
    """The rows of a predict CSV with their probabilities (binary files carry p of the positive
    class only: the other class has the rest), and each row's `given_column` (a label it already
    has) when named; rows with an error are left out."""
    scored = Scored()
    with path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    columns = [f"p_{c}" for c in class_names] if len(class_names) > 2 else [f"p_{positive_class}"]
    missing = [c for c in ["path", *columns] if rows and c not in rows[0]]
    if not rows or missing:
        raise UserError(f"{path} is not a predictions.csv of this model (missing {missing or 'rows'}).")
    positive = list(class_names).index(positive_class)
    for row in rows:
        if row.get("error") or not row[columns[0]]:
            scored.skipped.append((row["path"], row.get("error") or "not scored"))
            continue
        if len(class_names) > 2:
            probs = np.array([float(row[c]) for c in columns])
        else:
            p = float(row[columns[0]])
            probs = np.array([1 - p, p]) if positive == 1 else np.array([p, 1 - p])
        frame = int(row["frame"]) if row.get("frame") else None
        time_s = float(row["time_s"]) if row.get("time_s") else None
        given = row[given_column] if given_column else None
        scored.add(InputItem(row["path"], frame=frame, time_s=time_s), probs, given)
    return scored


def read_label_issues(source: Path, class_names: Sequence[str], positive_class: str) -> Scored:
    """cleanlab's doubtful labels of a CV sweep, most doubtful first, each with its given label."""
    path = source if source.name == LABEL_ISSUES_FILE else source / LABEL_ISSUES_FILE
    return read_predictions_csv(path, class_names, positive_class, given_column="label")


def collect(input: str, order: str, predictor: Predictor, every_s: float, batch_size: int) -> Scored:
    """The scored items of `input`, whichever kind of source it is."""
    source = Path(input).expanduser()
    names, positive = predictor.contract.class_names, predictor.contract.positive_class
    check_order(order, predictor, source)
    if order == "label_issues":
        return read_label_issues(source, names, positive)
    if source.is_file() and source.suffix.lower() == ".csv":
        if order in ("disagreement", "diverse"):
            raise UserError(f"order={order} scores the photos itself: give the folder, not {source.name}.")
        return read_predictions_csv(source, names, positive)
    return score_sources(predictor, list_sources(input), order, every_s, batch_size)


def build_items(scored: Scored, order: str, predictor: Predictor) -> list[Item]:
    """The queue in `order`, each item with its file digest (videos hashed once)."""
    if not scored.paths:
        raise UserError("Nothing to triage: no input could be read (see the warnings above).")
    for path, error in scored.skipped[:5]:
        log.warning("Left out of the queue: %s (%s).", path, error)
    if scored.skipped:
        log.warning(
            "%d input(s) left out of the queue: they could not be read or scored.", len(scored.skipped)
        )
    positions, scores = ordered(order, scored, predictor.rule)
    digests: dict[str, str] = {}
    items = []
    for position, i in enumerate(positions):
        path = scored.paths[i]
        if scored.frames[i] is None or path not in digests:  # a video: hashed once, not per frame
            digests[path] = file_digest(path)
        digest = digests[path]
        probs = [round(float(p), 6) for p in scored.probs[i]]
        score = round(float(scores[i]), 6) if np.isfinite(scores[i]) else None
        items.append(
            Item(position, path, scored.frames[i], scored.times[i], digest, probs, scored.given[i], score)
        )
    return items

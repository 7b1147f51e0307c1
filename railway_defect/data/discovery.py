"""Find labelled images under a data root, whatever its layout, and assign every file to a split.

Three layouts are understood: split folders (Train/Validation/Test, each with class folders),
plain class folders (split here), and a manifest.csv (path,label[,split,group]). Near-duplicate
photos share a group, and a group never straddles splits.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import heapq
import io
import itertools
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from railway_defect.utils.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# data.train_on: train only (validation held out), or train + validation pooled (no validation)
TRAIN_ON_MODES = ("train", "train_and_val")
TRAIN_AND_VAL = "train_and_val"
MANIFEST_NAME = "manifest.csv"
# difflib ratio above which a rare manifest label is taken for a typo of a frequent one
TYPO_SIMILARITY = 0.85
# photos whose file-name timestamps are this close were taken in one burst at one spot
# (data.group_window_s; `day` groups every photo of one calendar day: a session)
BURST_SECONDS = 10
SESSION = "day"
GroupWindow = float | int | str
# the seed of the locked Test split (data.test_fraction): never a training or fold seed, so that no
# study step that varies those can move a Test photo into training
TEST_SPLIT_SEED = 0
# data.fold=refit: the fold models' recipe trained on the whole pool (nested CV's refit)
REFIT = "refit"
_TIMESTAMP = re.compile(r"(20\d\d)(\d\d)(\d\d)[_-]?(\d\d)(\d\d)(\d\d)")


@dataclass(frozen=True, slots=True)  # slots: no __dict__ per sample (millions of them in discovery)
class Sample:
    path: Path
    label: str
    group: str


class LabelOverlay(Protocol):
    """Reviewed labels laid over a layout's splits (data.labels: data.labels.ReviewedLabels)."""

    def apply(self, splits: dict[str, list[Sample]]) -> tuple[dict[str, list[Sample]], dict[str, Any]]: ...


@dataclass
class DatasetIndex:
    layout: str
    splits: dict[str, list[Sample]]
    # files found but not used, each with the reason (not an image, missing, ...)
    ignored: list[dict[str, str]] = field(default_factory=list)
    # what data.labels changed (data_report.json `labels`); None without reviewed labels
    labels: dict[str, Any] | None = None

    @property
    def classes(self) -> list[str]:
        return sorted({s.label for samples in self.splits.values() for s in samples})

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: dict(sorted(Counter(s.label for s in samples).items()))
            for split, samples in self.splits.items()
        }


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _walk_files(folder: Path) -> list[Path]:
    """All visible files below `folder`, sorted; symlinked folders are not followed (no loops)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        base = Path(dirpath)  # once per folder: building Paths dominates at 200,000 files
        files.extend(base / f for f in sorted(filenames) if not _is_hidden(f))
    return files


def _subdirs(folder: Path, root: Path, ignored: list[dict[str, str]]) -> list[Path]:
    """Visible sub-folders. A symlink to a folder inside the data root (`Train/loop -> Train`) would
    count its images twice, under a made-up class: it is left out with a warning. A symlink to a
    folder elsewhere (data on another disk) is followed, with a warning, once: not below it."""
    found = []
    for p in sorted(folder.iterdir()):
        if _is_hidden(p.name) or not p.is_dir():
            continue
        if p.is_symlink():
            target, real_root = p.resolve(), root.resolve()
            if target.is_relative_to(real_root) or real_root.is_relative_to(target):
                reason = f"symlink to {target}, a folder inside the data root (its images are already used)"
                if target != real_root and real_root.is_relative_to(target):
                    reason = f"symlink to {target}, a folder that contains the data root (a loop)"
                log.warning("Ignoring %s: %s.", p, reason)
                ignored.append({"path": str(p), "reason": reason})
                continue
            log.warning("Following the symlink %s -> %s (symlinks below it are not followed).", p, target)
        found.append(p)
    return found


def _scan_class_folders(folder: Path, root: Path, ignored: list[dict[str, str]]) -> list[tuple[Path, str]]:
    samples = []
    for class_dir in _subdirs(folder, root, ignored):
        found = 0
        for path in _walk_files(class_dir):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                samples.append((path, class_dir.name))
                found += 1
            else:
                ignored.append({"path": str(path), "reason": "not an image file extension"})
        if not found:
            log.warning("Class folder %s has no images; it is ignored.", class_dir)
    return samples


def _timestamp(path: Path) -> datetime | None:
    match = _TIMESTAMP.search(path.name)
    if match:
        with contextlib.suppress(ValueError):
            return datetime(*map(int, match.groups()))
    return None


def check_group_window(window_s: GroupWindow) -> GroupWindow:
    if window_s == SESSION:
        return window_s
    if isinstance(window_s, bool) or not isinstance(window_s, int | float) or window_s < 0:
        raise UserError(
            f"data.group_window_s must be a number of seconds >= 0 or {SESSION!r} (one group per "
            f"day of photos), got {window_s!r}."
        )
    return window_s


def infer_groups(paths: list[Path], window_s: GroupWindow = BURST_SECONDS) -> list[str]:
    """Group photos by file-name timestamp: each photo joins the previous one when taken within
    `window_s` seconds of it (a chain: a burst, or a walk for a wider window), or with `day` every
    photo of one calendar day. Photos without a timestamp stand alone."""
    check_group_window(window_s)
    stamped = sorted((t, i) for i, p in enumerate(paths) if (t := _timestamp(p)) is not None)
    groups = [str(p) for p in paths]
    for (prev_time, prev_i), (time, i) in itertools.pairwise(stamped):
        same = (
            prev_time.date() == time.date()
            if window_s == SESSION
            else (time - prev_time).total_seconds() <= window_s
        )
        if same:
            groups[i] = groups[prev_i]
    return groups


def _to_samples(pairs: list[tuple[Path, str]]) -> list[Sample]:
    groups = infer_groups([p for p, _ in pairs])
    return [Sample(path, label, group) for (path, label), group in zip(pairs, groups, strict=False)]


def _split_name(name: str, where: str) -> str:
    key = name.strip().lower()
    if key not in SPLIT_ALIASES:
        raise UserError(
            f"{where}: unknown split '{name}'; use one of Train, Validation (or val/valid), Test."
        )
    return SPLIT_ALIASES[key]


def _manifest_rows(manifest: Path) -> list[dict[str, str]]:
    """The rows, keys lower-cased; a file that is not UTF-8 (Excel's Latin-1 export) is a one-line error."""
    return list(_iter_manifest_rows(manifest))


def _iter_manifest_rows(manifest: Path) -> Iterator[dict[str, str]]:
    """The rows one at a time (a dict per row for millions of rows is a lot of memory); the header
    and the encoding are checked before the first row."""
    try:
        text = manifest.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = manifest.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(
            f"{manifest} is not UTF-8 (byte 0x{e.object[e.start]:02x} on line {line}); save it as UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {manifest.name} > utf8.csv."
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = {c.strip().lower() for c in reader.fieldnames or []}
    if not {"path", "label"} <= columns:
        raise UserError(
            f"{manifest} needs the columns path,label (optional: split,group); found {sorted(columns)}."
        )
    return ({k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader)


def _manifest_path(root: Path, value: str, where: str) -> Path:
    """`value` relative to the root (or absolute); a relative path must not climb out of the root."""
    path = Path(value)
    if path.is_absolute():
        return path
    if not Path(os.path.normpath(root / path)).is_relative_to(os.path.normpath(root)):
        raise UserError(
            f"{where}: path '{value}' points outside the data root {root}; move the file under it "
            "or give an absolute path."
        )
    return root / path


def _check_label_typos(labels: Counter[str], lines: dict[str, int], manifest: Path) -> None:
    """A rare label that is a near-miss of a frequent one (`Defectve` beside `Defective`) is a typo, not
    a new class. Pairs like `defective`/`non-defective` are further apart than TYPO_SIMILARITY."""
    for label, count in labels.items():
        frequent = [o for o in labels if o != label and count <= max(2, labels[o] // 4)]
        close = [o for o in frequent if o.casefold() == label.casefold()] or difflib.get_close_matches(
            label, frequent, n=1, cutoff=TYPO_SIMILARITY
        )
        if close:
            raise UserError(
                f"{manifest} line {lines[label]}: label '{label}' ({count} row(s)) looks like a typo of "
                f"'{close[0]}' ({labels[close[0]]} rows); correct it, or rename one of the two classes."
            )


def _unlisted_images(root: Path, listed: Collection[str], ignored: list[dict[str, str]]) -> None:
    """Images under the root that the manifest does not name: not used, but counted and reported."""
    unlisted = [
        p
        for p in _walk_files(root)
        if p.suffix.lower() in IMAGE_SUFFIXES and os.path.abspath(p) not in listed
    ]
    if unlisted:
        log.warning(
            "%d image file(s) under %s are not listed in %s and not used (e.g. %s); see data_report.json.",
            len(unlisted),
            root,
            MANIFEST_NAME,
            ", ".join(str(p.relative_to(root)) for p in unlisted[:3]),
        )
    ignored.extend({"path": str(p), "reason": f"not listed in {MANIFEST_NAME}"} for p in unlisted)


def _read_manifest(root: Path, ignored: list[dict[str, str]]) -> dict[str, list[Sample]]:
    manifest = root / MANIFEST_NAME
    rows = _iter_manifest_rows(manifest)
    splits: dict[str, list[Sample]] = {}
    # each file once: absolute path (a str: a Path object per row costs ~4x more) -> (line, label,
    # split) of its first row
    first_row: dict[str, tuple[int, str, str]] = {}
    labels: Counter[str] = Counter()
    label_lines: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        path = _manifest_path(root, row["path"], f"{manifest} line {line}")
        key = os.path.abspath(path)
        problem = None
        if not row["label"]:
            problem = f"{MANIFEST_NAME} line {line} has no label"
        elif not path.is_file():
            problem = f"listed in {MANIFEST_NAME} (line {line}) but not found"
        if problem:
            log.warning("Skipping %s: %s.", path, problem)
            ignored.append({"path": str(path), "reason": problem})
            continue
        split = _split_name(row["split"], f"{manifest} line {line}") if row.get("split") else "train"
        if key in first_row:
            first, label, first_split = first_row[key]
            if (label, first_split) != (row["label"], split):
                raise UserError(
                    f"{manifest}: {row['path']} is listed on line {first} as {label} ({first_split}) and on "
                    f"line {line} as {row['label']} ({split}); one file can have one label and one split."
                )
            reason = f"listed twice in {MANIFEST_NAME} (lines {first} and {line}); used once"
            log.warning("%s is %s.", path, reason)
            ignored.append({"path": str(path), "reason": reason})
            continue
        first_row[key] = (line, row["label"], split)
        labels[row["label"]] += 1
        label_lines.setdefault(row["label"], line)
        group = row.get("group") or str(path)
        splits.setdefault(split, []).append(Sample(path, row["label"], group))
    _check_label_typos(labels, label_lines, manifest)
    _unlisted_images(root, first_row.keys(), ignored)
    return splits


# above this many groups, folds come from `_fast_group_folds`: scikit-learn's StratifiedGroupKFold
# loops in Python over every group and fold (83 s for 160,000 single-photo groups on 2 cores)
FAST_FOLDS_ABOVE = 20_000


def _fast_group_folds(labels: list[str], groups: list[str], n_splits: int, seed: int) -> list[np.ndarray]:
    """Test indices of `n_splits` stratified, group-aware folds in O(n log k): the groups of each
    (majority) class, shuffled by `seed` and largest first, each go to the fold that holds the
    fewest images of that class so far."""
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    by_class: dict[str, list[list[int]]] = {}
    for indices in members.values():
        label = Counter(labels[i] for i in indices).most_common(1)[0][0]
        by_class.setdefault(label, []).append(indices)
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(n_splits)]
    for label in sorted(by_class):
        class_groups = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        class_groups.sort(key=len, reverse=True)  # stable: ties keep the shuffled order
        heap = [(0, int(fold)) for fold in rng.permutation(n_splits)]
        for indices in class_groups:
            count, fold = heapq.heappop(heap)
            folds[fold].extend(indices)
            heapq.heappush(heap, (count + len(indices), fold))
    return [np.array(sorted(fold), dtype=int) for fold in folds]


def _group_folds(
    labels: list[str], groups: list[str], n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) indices of stratified group K-fold: scikit-learn's, or `_fast_group_folds`
    for data sets with more than FAST_FOLDS_ABOVE groups."""
    if len(set(groups)) <= FAST_FOLDS_ABOVE:
        from sklearn.model_selection import StratifiedGroupKFold

        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # a class with fewer groups than folds is reported by callers
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            return list(splitter.split(np.zeros(len(labels)), labels, groups))
    everything = np.arange(len(labels))
    return [
        (np.setdiff1d(everything, test), test) for test in _fast_group_folds(labels, groups, n_splits, seed)
    ]


def holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified, group-aware hold-out: about `fraction` of the samples, whole groups only."""
    if not 0 < fraction < 1:
        raise UserError(f"data.val_fraction must be between 0 and 1, got {fraction}.")
    n_splits = max(2, round(1 / fraction))
    groups = [s.group for s in samples]
    if len(set(groups)) < n_splits:
        raise UserError(
            f"Only {len(set(groups))} independent photo groups to hold out a validation split from; "
            "add images or provide a Validation folder."
        )
    largest = max(Counter(s.label for s in samples).values())
    if largest < n_splits:
        raise UserError(
            f"No class has {n_splits} photos, so data.val_fraction={fraction} cannot be held out "
            f"stratified (the largest has {largest}); raise data.val_fraction, add images or provide a "
            "Validation folder."
        )
    train_idx, val_idx = _group_folds([s.label for s in samples], groups, n_splits, seed)[0]
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def pooled_groups(samples: Sequence[Sample], window_s: GroupWindow = BURST_SECONDS) -> list[str]:
    """Groups for samples pooled across splits: declared groups (a manifest's `group`, or the
    bursts found per split folder) joined with the photos taken within `window_s` of each other
    over the whole pool (a burst may have been cut by the splits; a wider window joins a walk)."""
    parent = list(range(len(samples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(names: Sequence[str]) -> None:
        first: dict[str, int] = {}
        for i, name in enumerate(names):
            a, b = root(i), root(first.setdefault(name, i))
            parent[max(a, b)] = min(a, b)

    join([s.group for s in samples])
    join(infer_groups([s.path for s in samples], window_s))
    return [samples[root(i)].group for i in range(len(samples))]


def group_counts(samples: Sequence[Sample]) -> str:
    """'Defective: 12 groups, Non defective: 3 groups', for errors about too few groups."""
    groups: dict[str, set[str]] = {}
    for s in samples:
        groups.setdefault(s.label, set()).add(s.group)
    return ", ".join(f"{label}: {len(g)} groups" for label, g in sorted(groups.items()))


def _check_enough_groups(samples: Sequence[Sample], folds: int, what: str, ask: str) -> None:
    """Every class needs a group in each fold, or some fold cannot estimate (or train) it."""
    fewest = min(len({s.group for s in samples if s.label == c}) for c in {s.label for s in samples})
    if fewest < folds:
        raise UserError(
            f"{what} needs at least {folds} independent photo groups per class; {group_counts(samples)}. "
            f"{ask}"
        )


def _regrouped(samples: Sequence[Sample], window_s: GroupWindow) -> list[Sample]:
    groups = pooled_groups(samples, window_s)
    return [replace(s, group=g) for s, g in zip(samples, groups, strict=True)]


def cross_validation_fold(
    samples: list[Sample], num_folds: int, fold: int | str, seed: int, window_s: GroupWindow = BURST_SECONDS
) -> tuple[list[Sample], list[Sample]]:
    """Fold `fold` of a stratified, group-aware K-fold split: (train, val). The same `seed` gives
    the same partition in every job, so the K validation folds cover every sample exactly once.
    `fold=refit`: the recipe refitted on the whole pool (nothing validates), as the final model of
    a cross-validation is; nested CV scores it on the outer fold."""
    if num_folds < 2:
        raise UserError(f"data.num_folds must be 2 or more, got {num_folds}.")
    if fold == REFIT:
        return list(samples), []
    if not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise UserError(
            f"data.fold must be between 0 and {num_folds - 1} for {num_folds} folds "
            f"(or {REFIT!r}), got {fold}."
        )
    samples = _regrouped(samples, window_s)
    groups = [s.group for s in samples]
    if len(set(groups)) < num_folds:
        raise UserError(
            f"Only {len(set(groups))} independent photo groups for {num_folds} folds "
            f"({group_counts(samples)}); "
            "lower data.num_folds, narrow data.group_window_s or add images."
        )
    folds = _group_folds([s.label for s in samples], groups, num_folds, seed)
    train_idx, val_idx = folds[fold]
    missing = {s.label for s in samples} - {samples[i].label for i in val_idx}
    if missing:
        log.warning("Fold %d of %d has no validation images of %s.", fold, num_folds, sorted(missing))
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


@dataclass(frozen=True)
class HeldOutTestFold:
    """Which photos form the Test split when the data have none: `folds` stratified, group-aware
    folds of the labelled photos, fold `fold` held out (data.test_fraction: fold 0 of 1/fraction,
    with a seed of its own; nested CV: its outer fold)."""

    folds: int
    fold: int
    seed: int
    what: str

    @classmethod
    def locked(cls, test_fraction: float) -> HeldOutTestFold:
        """data.test_fraction: fold 0 of 1/fraction folds, with a seed of its own."""
        if not 0 < test_fraction < 0.5:
            raise UserError(f"data.test_fraction must be between 0 and 0.5, got {test_fraction}.")
        folds = max(2, round(1 / test_fraction))
        return cls(folds, 0, TEST_SPLIT_SEED, f"data.test_fraction={test_fraction}")

    @classmethod
    def outer(cls, outer_folds: int, outer_fold: int, seed: int) -> HeldOutTestFold:
        """Nested CV's outer fold `outer_fold` of `outer_folds`."""
        if outer_folds < 2 or not 0 <= outer_fold < outer_folds:
            raise UserError(
                f"data.outer_folds must be 2 or more and data.outer_fold between 0 and outer_folds - 1, "
                f"got {outer_folds} and {outer_fold}."
            )
        return cls(outer_folds, outer_fold, seed, f"data.outer_folds={outer_folds}")

    def split(self, splits: dict[str, list[Sample]], window_s: GroupWindow) -> dict[str, list[Sample]]:
        """`splits` with the held-out fold as Test, the other photos in their own splits."""
        if "test" in splits:
            log.info(
                "%s: the data's own Test split (%d images) is set aside unread.",
                self.what,
                len(splits["test"]),
            )
        pool = _regrouped(splits.get("train", []) + splits.get("val", []), window_s)
        _check_enough_groups(
            pool,
            self.folds,
            self.what,
            "Lower the number of folds (or raise the fraction), narrow data.group_window_s, or add photos.",
        )
        _, test_idx = _group_folds([s.label for s in pool], [s.group for s in pool], self.folds, self.seed)[
            self.fold
        ]
        held = {pool[i].path for i in test_idx}
        kept = {split: [s for s in splits.get(split, []) if s.path not in held] for split in ("train", "val")}
        kept = {split: samples for split, samples in kept.items() if samples}
        test = [s for split in ("train", "val") for s in splits.get(split, []) if s.path in held]
        log.info("%s: %d photos held out as the Test split.", self.what, len(test))
        return {**kept, "test": test}


def held_out_test_folds(
    test_fraction: float | None, outer_folds: int | None, outer_fold: int, seed: int
) -> list[HeldOutTestFold]:
    """The Test splits to hold out, in order: the locked one (data.test_fraction), then nested
    CV's outer fold among the other photos (the locked split is then set aside unread)."""
    held = [HeldOutTestFold.locked(test_fraction)] if test_fraction else []
    return held + ([HeldOutTestFold.outer(outer_folds, outer_fold, seed)] if outer_folds else [])


def check_nested_groups(
    root: Path,
    outer_folds: int,
    inner_folds: int,
    seed: int,
    window_s: GroupWindow,
    test_fraction: float | None = None,
    labels: LabelOverlay | None = None,
) -> None:
    """Before a nested CV starts its jobs: every outer fold, and every inner fold of each outer
    training set, needs a group of each class; else one line with the counts and what to ask."""
    given = _labelled_splits(Path(root), [], labels)[1]
    for outer_fold in range(outer_folds):
        splits = given
        for held_out in held_out_test_folds(test_fraction, outer_folds, outer_fold, seed):
            splits = held_out.split(splits, window_s)
        rest = _regrouped(splits.get("train", []) + splits.get("val", []), window_s)
        _check_enough_groups(
            rest,
            inner_folds,
            f"data.num_folds={inner_folds} within outer fold {outer_fold}",
            "Lower data.num_folds or data.outer_folds, narrow data.group_window_s, or add photos.",
        )


def _split_folders(root: Path, ignored: list[dict[str, str]]) -> dict[str, Path]:
    """The split folders (Train, Validation, Test and their aliases) directly under `root`."""
    split_dirs: dict[str, Path] = {}
    for folder in _subdirs(root, root, ignored):
        split = SPLIT_ALIASES.get(folder.name.lower())
        if split is None:
            continue
        if split in split_dirs:
            raise UserError(
                f"{root} has two folders for the {split} split: {split_dirs[split].name} and {folder.name}."
            )
        split_dirs[split] = folder
    return split_dirs


def _read_layout(root: Path, ignored: list[dict[str, str]]) -> tuple[str, dict[str, list[Sample]]]:
    """The layout of `root` (manifest, split folders or class folders) and its samples per split."""
    if (root / MANIFEST_NAME).is_file():
        return "manifest", _read_manifest(root, ignored)
    split_dirs = _split_folders(root, ignored)
    if not split_dirs:
        return "class_folders", {"train": _to_samples(_scan_class_folders(root, root, ignored))}
    return "split_folders", {
        split: _to_samples(_scan_class_folders(folder, root, ignored)) for split, folder in split_dirs.items()
    }


def discover(
    root: Path,
    val_fraction: float = 0.2,
    seed: int = 42,
    num_folds: int | None = None,
    fold: int | str = 0,
    train_on: str = "train",
    group_window_s: GroupWindow = BURST_SECONDS,
    holdouts: Sequence[HeldOutTestFold] = (),
    labels: LabelOverlay | None = None,
) -> DatasetIndex:
    """Index `root`; when it has no validation split, hold one out of the training data. With
    `num_folds`, the train and validation splits are pooled and fold `fold` becomes validation;
    with `train_on=train_and_val` they are pooled into the training split and nothing validates.
    `holdouts` first hold a Test split out of the labelled photos (held_out_test_folds);
    `group_window_s` says which photos are too close in time to sit on both sides of a split made
    here; `labels` (data.labels) are laid over the layout's labels before anything is split."""
    root = Path(root)
    check_group_window(group_window_s)
    ignored: list[dict[str, str]] = []
    layout, splits, relabelled = _labelled_splits(root, ignored, labels)
    for held_out in holdouts:
        splits = held_out.split(splits, group_window_s)
    if num_folds is not None:
        splits = _with_fold(splits, num_folds, fold, seed, group_window_s)
    elif fold != 0:
        raise UserError(f"data.fold={fold} needs data.num_folds=K (K >= 2) to say how many folds there are.")
    if train_on == TRAIN_AND_VAL and fold != REFIT:
        return replace(_pool_for_training(root, layout, splits, ignored, num_folds), labels=relabelled)
    if "val" not in splits and fold != REFIT:
        splits["train"], splits["val"] = holdout(
            _regrouped(splits["train"], group_window_s), val_fraction, seed
        )
        log.info(
            "No validation split in %s: held out %d images (data.val_fraction=%s).",
            root,
            len(splits["val"]),
            val_fraction,
        )
    _check_groups(splits)
    return DatasetIndex(layout=layout, splits=splits, ignored=ignored, labels=relabelled)


def _labelled_splits(
    root: Path, ignored: list[dict[str, str]], labels: LabelOverlay | None = None
) -> tuple[str, dict[str, list[Sample]], dict[str, Any] | None]:
    """The layout of `root` and its non-empty splits (with `labels` laid over them) and what the
    labels changed; no images, or none to train on, is an error."""
    layout, splits = _read_layout(root, ignored)
    relabelled = None
    if labels is not None:
        splits, relabelled = labels.apply(splits)
    splits = {split: samples for split, samples in splits.items() if samples}
    if not splits:
        raise UserError(
            f"No images found in {root}. Expected Train/Validation folders with one sub-folder per class, "
            f"class sub-folders, or a {MANIFEST_NAME} (path,label)."
        )
    if "train" not in splits:
        raise UserError(f"{root} has no training images (found splits: {', '.join(sorted(splits))}).")
    return layout, splits, relabelled


def _with_fold(
    splits: dict[str, list[Sample]], num_folds: int, fold: int | str, seed: int, group_window_s: GroupWindow
) -> dict[str, list[Sample]]:
    """Train and validation pooled, fold `fold` validating (the refit: nothing validates)."""
    pool = splits["train"] + splits.pop("val", [])
    splits["train"], splits["val"] = cross_validation_fold(pool, num_folds, fold, seed, group_window_s)
    if fold == REFIT:
        splits.pop("val")
    train, val = len(splits["train"]), len(splits.get("val", []))
    log.info(
        "Fold %s of %d: %d training and %d validation images (train and validation pooled).",
        fold,
        num_folds,
        train,
        val,
    )
    return splits


def check_train_on(train_on: str, num_folds: int | None) -> None:
    """Training on the validation images leaves no fold to validate: refused, in each job and
    (the Hydra callback SweepPlanCheck) before a cross-validation sweep starts its first job."""
    if train_on == TRAIN_AND_VAL and num_folds is not None:
        raise UserError(
            "data.train_on=train_and_val trains on the validation images too, so it cannot run a "
            "cross-validation fold; drop data.num_folds (or set data.train_on=train)."
        )


def _pool_for_training(
    root: Path,
    layout: str,
    splits: dict[str, list[Sample]],
    ignored: list[dict[str, str]],
    num_folds: int | None,
) -> DatasetIndex:
    """Every labelled photo but the Test split trains the final model of a recipe chosen by
    cross-validation; a Test split stays held out."""
    check_train_on(TRAIN_AND_VAL, num_folds)
    splits["train"] = splits["train"] + splits.pop("val", [])
    log.info("data.train_on=train_and_val: %d training images, no validation split.", len(splits["train"]))
    _check_groups(splits)
    return DatasetIndex(layout=layout, splits=splits, ignored=ignored)


def _check_groups(splits: dict[str, list[Sample]]) -> None:
    seen: dict[str, str] = {}
    for split, samples in splits.items():
        for sample in samples:
            other = seen.setdefault(sample.group, split)
            if other != split:
                raise UserError(
                    f"Group '{sample.group}' appears in both the {other} and {split} splits; "
                    "a group must sit in one split."
                )

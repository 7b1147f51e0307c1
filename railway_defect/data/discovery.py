"""Find labelled images under a data root, whatever its layout, and assign every file to a split.

Three layouts are understood: split folders (Train/Validation/Test, each with class folders),
plain class folders (split here), and a manifest.csv (path,label[,split,group]). Near-duplicate
photos share a group, and a group never straddles splits.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from railway_defect.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MANIFEST_NAME = "manifest.csv"
# photos whose file-name timestamps are this close were taken in one burst at one spot
BURST_SECONDS = 10
_TIMESTAMP = re.compile(r"(20\d\d)(\d\d)(\d\d)[_-]?(\d\d)(\d\d)(\d\d)")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    group: str


@dataclass
class DatasetIndex:
    layout: str
    splits: dict[str, list[Sample]]
    # files found but not used, each with the reason (not an image, missing, ...)
    ignored: list[dict[str, str]] = field(default_factory=list)

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
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not _is_hidden(f))
    return files


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _scan_class_folders(folder: Path, ignored: list[dict[str, str]]) -> list[tuple[Path, str]]:
    samples = []
    for class_dir in _subdirs(folder):
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


def infer_groups(paths: list[Path]) -> list[str]:
    """Group photos taken within BURST_SECONDS of each other (by file-name timestamp); others stand alone."""
    stamped = []
    for i, path in enumerate(paths):
        match = _TIMESTAMP.search(path.name)
        if match:
            with contextlib.suppress(ValueError):
                stamped.append((datetime(*map(int, match.groups())), i))
    groups = [str(p) for p in paths]
    stamped.sort()
    for (prev_time, prev_i), (time, i) in itertools.pairwise(stamped):
        if (time - prev_time).total_seconds() <= BURST_SECONDS:
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


def _read_manifest(root: Path, ignored: list[dict[str, str]]) -> dict[str, list[Sample]]:
    manifest = root / MANIFEST_NAME
    with manifest.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {c.strip().lower() for c in reader.fieldnames or []}
        if not {"path", "label"} <= columns:
            raise UserError(
                f"{manifest} needs the columns path,label (optional: split,group); found {sorted(columns)}."
            )
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    splits: dict[str, list[Sample]] = {}
    for line, row in enumerate(rows, start=2):
        path = Path(row["path"])
        path = path if path.is_absolute() else root / path
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
        group = row.get("group") or str(path)
        splits.setdefault(split, []).append(Sample(path, row["label"], group))
    return splits


def holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified, group-aware hold-out: about `fraction` of the samples, whole groups only."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 < fraction < 1:
        raise UserError(f"data.val_fraction must be between 0 and 1, got {fraction}.")
    n_splits = max(2, round(1 / fraction))
    groups = [s.group for s in samples]
    if len(set(groups)) < n_splits:
        raise UserError(
            f"Only {len(set(groups))} independent photo groups to hold out a validation split from; "
            "add images or provide a Validation folder."
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(samples)), [s.label for s in samples], groups))
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def pooled_groups(samples: list[Sample], layout: str) -> list[str]:
    """Groups for samples pooled across splits: declared manifest groups stay; everything else is
    grouped by file-name timestamp over the whole pool (a burst may have been cut by the splits)."""
    if layout != "manifest":
        return infer_groups([s.path for s in samples])
    undeclared = [i for i, s in enumerate(samples) if s.group == str(s.path)]
    groups = [s.group for s in samples]
    for i, group in zip(undeclared, infer_groups([samples[i].path for i in undeclared]), strict=True):
        groups[i] = group
    return groups


def cross_validation_fold(
    samples: list[Sample], layout: str, num_folds: int, fold: int, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Fold `fold` of a stratified, group-aware K-fold split: (train, val). The same `seed` gives
    the same partition in every job, so the K validation folds cover every sample exactly once."""
    from sklearn.model_selection import StratifiedGroupKFold

    if num_folds < 2:
        raise UserError(f"data.num_folds must be 2 or more, got {num_folds}.")
    if not 0 <= fold < num_folds:
        raise UserError(f"data.fold must be between 0 and {num_folds - 1} for {num_folds} folds, got {fold}.")
    groups = pooled_groups(samples, layout)
    samples = [replace(s, group=g) for s, g in zip(samples, groups, strict=True)]
    if len(set(groups)) < num_folds:
        raise UserError(
            f"Only {len(set(groups))} independent photo groups for {num_folds} folds; "
            "lower data.num_folds or add images."
        )
    splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class with fewer groups than folds is reported below instead
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = list(splitter.split(np.zeros(len(samples)), [s.label for s in samples], groups))
    train_idx, val_idx = folds[fold]
    missing = {s.label for s in samples} - {samples[i].label for i in val_idx}
    if missing:
        log.warning("Fold %d of %d has no validation images of %s.", fold, num_folds, sorted(missing))
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def discover(
    root: Path, val_fraction: float = 0.2, seed: int = 42, num_folds: int | None = None, fold: int = 0
) -> DatasetIndex:
    """Index `root`; when it has no validation split, hold one out of the training data. With
    `num_folds`, the train and validation splits are pooled and fold `fold` becomes validation."""
    root = Path(root)
    ignored: list[dict[str, str]] = []
    if (root / MANIFEST_NAME).is_file():
        layout, splits = "manifest", _read_manifest(root, ignored)
    else:
        split_dirs: dict[str, Path] = {}
        for folder in _subdirs(root):
            split = SPLIT_ALIASES.get(folder.name.lower())
            if split is None:
                continue
            if split in split_dirs:
                raise UserError(
                    f"{root} has two folders for the {split} split: "
                    f"{split_dirs[split].name} and {folder.name}."
                )
            split_dirs[split] = folder
        if split_dirs:
            layout = "split_folders"
            splits = {
                split: _to_samples(_scan_class_folders(folder, ignored))
                for split, folder in split_dirs.items()
            }
        else:
            layout, splits = "class_folders", {"train": _to_samples(_scan_class_folders(root, ignored))}
    splits = {split: samples for split, samples in splits.items() if samples}
    if not splits:
        raise UserError(
            f"No images found in {root}. Expected Train/Validation folders with one sub-folder per class, "
            f"class sub-folders, or a {MANIFEST_NAME} (path,label)."
        )
    if "train" not in splits:
        raise UserError(f"{root} has no training images (found splits: {', '.join(sorted(splits))}).")
    if num_folds is not None:
        pool = splits["train"] + splits.pop("val", [])
        splits["train"], splits["val"] = cross_validation_fold(pool, layout, num_folds, fold, seed)
        log.info(
            "Fold %d of %d: %d training and %d validation images (train and validation pooled).",
            fold,
            num_folds,
            len(splits["train"]),
            len(splits["val"]),
        )
    elif fold != 0:
        raise UserError(f"data.fold={fold} needs data.num_folds=K (K >= 2) to say how many folds there are.")
    if "val" not in splits:
        splits["train"], splits["val"] = holdout(splits["train"], val_fraction, seed)
        log.info(
            "No validation split in %s: held out %d images (data.val_fraction=%s).",
            root,
            len(splits["val"]),
            val_fraction,
        )
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

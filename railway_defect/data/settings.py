"""DataSettings: every data.* key of a run (conf/data/railway.yaml), as one frozen value that the
data module is built from and that refuses what Hydra cannot validate before any file is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from railway_defect.data.device import DECODE_MODES
from railway_defect.data.discovery import BURST_SECONDS, TRAIN_ON_MODES, GroupWindow
from railway_defect.data.images import DEFAULT_MAX_PIXELS, check_harmonize
from railway_defect.data.storage import STORAGE_MODES
from railway_defect.utils.errors import UserError

BALANCE_MODES = ("none", "sampler", "loss", "stratum")


@dataclass(frozen=True)
class DataSettings:
    """Args:
    root / url / sha256: the data folder, and a zip to fetch when it is missing.
    positive_class: the class metrics refer to.
    ordinal: the classes in their order, least to most severe; None = unordered (sorted by name).
    val_fraction, seed, num_folds, fold: how a validation split is made when the data have none,
        or which cross-validation fold validates; `seed` also orders and augments the batches.
    split_seed: the split's own seed (default `seed`): repeated training seeds on the same folds.
    train_on: `train`, or `train_and_val` (the final model of a recipe chosen by cross-validation:
        the validation images train too, and nothing validates). `fold=refit` trains on the
        whole cross-validation pool the same way (nested CV's refit of each outer fold).
    group_window_s: photos taken within this many seconds of each other (chained), or on one
        day (`day`), never sit on both sides of a split made here.
    test_fraction: hold out a grouped Test split (fixed seed of its own) that no study step reads;
        outer_folds, outer_fold: nested CV's outer fold as the Test split instead.
    image_size, cache_size, harmonize, max_pixels, cache_dir: decoding (storage form, decode
        size, decompression guard, on-disk cache) and the model's input size.
    batch_size, num_workers, balance: the loaders and balancing: none, sampler (classes drawn
        evenly), loss (class-weighted loss), stratum (every class x image-size stratum cell
        drawn evenly, so that how a photo was stored cannot stand in for its label).
    storage, stream_dir: decoded images in memory, or LitData chunks (auto: by size).
    decode: where batches are decoded and augmented: cpu (loader workers), gpu (the trainer's
        device, from stored JPEG bytes: data.device), auto (gpu on CUDA for large sets).
    report_path, splits_path: where data_report.json and splits.csv go; splits_from: a run's
        splits.csv to reuse instead of splitting (evaluation of that run).
    audit: run the shortcut audit on the train + validation images.
    labels: reviewed labels laid over the root's (a triage.sqlite, a manifest .csv or a Label
        Studio JSON export; data.labels.read_labels): they override folder labels, and reviewed
        photos the root does not list are added.
    """

    root: str | Path
    positive_class: str = "Defective"
    ordinal: tuple[str, ...] | None = None
    url: str | None = None
    sha256: str | None = None
    val_fraction: float = 0.2
    train_on: str = "train"
    image_size: int = 224
    cache_size: int = 256
    cache_dir: str | Path | None = None
    storage: str = "auto"
    decode: str = "auto"
    stream_dir: str | Path | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int = 32
    num_workers: int | None = None
    balance: str = "none"
    seed: int = 42
    split_seed: int | None = None
    num_folds: int | None = None
    fold: int | str = 0
    group_window_s: GroupWindow = BURST_SECONDS
    test_fraction: float | None = None
    outer_folds: int | None = None
    outer_fold: int = 0
    report_path: str | Path | None = None
    splits_path: str | Path | None = None
    splits_from: str | Path | None = None
    harmonize: str = "none"
    audit: bool = True
    labels: str | Path | None = None

    def __post_init__(self) -> None:
        if self.ordinal is not None:
            object.__setattr__(self, "ordinal", tuple(str(c) for c in self.ordinal))
            if len(set(self.ordinal)) != len(self.ordinal) or len(self.ordinal) < 2:
                raise UserError(
                    f"data.ordinal={list(self.ordinal)} must name two or more classes, each once."
                )
        if self.train_on not in TRAIN_ON_MODES:
            raise UserError(f"data.train_on={self.train_on!r} is not one of {', '.join(TRAIN_ON_MODES)}.")
        try:
            check_harmonize(self.harmonize)
        except ValueError as e:
            raise UserError(f"{e}.") from None
        if self.decode not in DECODE_MODES:
            raise UserError(f"data.decode={self.decode!r} is not one of {', '.join(DECODE_MODES)}.")
        if self.balance not in BALANCE_MODES:
            raise UserError(f"data.balance={self.balance!r} is not one of {', '.join(BALANCE_MODES)}.")
        if self.batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {self.batch_size}.")
        if self.storage not in STORAGE_MODES:
            raise UserError(f"data.storage={self.storage!r} is not one of {', '.join(STORAGE_MODES)}.")
        if self.cache_size < self.image_size:
            raise UserError(
                f"data.cache_size ({self.cache_size}) must be at least data.image_size ({self.image_size})."
            )

"""RailwayDataModule: discovers the data, decodes every image once into a cache, reports what it
skipped, and serves augmented training batches and deterministic evaluation batches."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from railway_defect.data.discovery import DatasetIndex, Sample, discover
from railway_defect.data.download import download_and_extract
from railway_defect.data.images import DecodedImages, decode_files
from railway_defect.data.transforms import build_transform
from railway_defect.errors import UserError
from railway_defect.outputs import write_json_atomic
from railway_defect.paths import DATA_DIR_ENV, data_root_candidates

log = logging.getLogger(__name__)

BALANCE_MODES = ("none", "sampler", "loss")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DecodedImageDataset(Dataset):
    """Already-decoded images + integer targets; only the transform runs per item."""

    def __init__(self, images: Sequence[np.ndarray], targets: Sequence[int], transform: Callable[..., dict]):
        self.images, self.targets, self.transform = list(images), list(targets), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.images[index])["image"], self.targets[index]


def seed_worker(worker_id: int) -> None:
    """Seed numpy/random (as Lightning does) and the worker's copy of the augmentation pipeline,
    which would otherwise repeat the same augmentations in every worker."""
    pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**32)


def default_num_workers() -> int:
    """Images are decoded once up front, so workers only run augmentation: on 2 cores the model
    needs both, and worker processes cost more than they save."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cpus <= 2 else min(8, cpus // 2)


class RailwayDataModule(LightningDataModule):
    def __init__(
        self,
        root: str | Path,
        positive_class: str = "Defective",
        url: str | None = None,
        sha256: str | None = None,
        val_fraction: float = 0.2,
        image_size: int = 224,
        cache_size: int = 256,
        cache_dir: str | Path | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        balance: str = "none",
        seed: int = 42,
        num_folds: int | None = None,
        fold: int = 0,
        report_path: str | Path | None = None,
        train_transforms: Sequence[Any] = (),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        if balance not in BALANCE_MODES:
            raise UserError(f"data.balance={balance!r} is not one of {', '.join(BALANCE_MODES)}.")
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}.")
        if cache_size < image_size:
            raise UserError(
                f"data.cache_size ({cache_size}) must be at least data.image_size ({image_size})."
            )
        self.root = Path(root).expanduser()
        self.positive_class = positive_class
        self.url, self.sha256 = url, sha256
        self.val_fraction, self.seed = val_fraction, seed
        self.num_folds, self.fold = num_folds, fold
        self.image_size, self.cache_size = image_size, cache_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.balance = balance
        self.report_path = Path(report_path) if report_path else None
        self.train_transform = build_transform(list(train_transforms), image_size, mean, std, seed=seed)
        self.eval_transform = build_transform([], image_size, mean, std)
        self.index: DatasetIndex | None = None
        self.decoded: DecodedImages | None = None
        self.splits: dict[str, list[Sample]] = {}
        # one generator for the run: reproducible, yet every epoch draws a new balanced sample
        self._sampler_generator = torch.Generator().manual_seed(seed)

    # ---- preparing ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.root.is_dir():
            return
        if self.url:
            download_and_extract(self.url, self.root, self.sha256)
            return
        looked = ", ".join(str(c) for c in data_root_candidates())
        raise UserError(
            f"Data folder {self.root} does not exist (default search: {looked}). "
            f"Set data.root=PATH or the {DATA_DIR_ENV} environment variable."
        )

    def setup(self, stage: str | None = None) -> None:
        if self.index is not None:
            return
        if not self.root.is_dir():
            self.prepare_data()
        index = discover(self.root, self.val_fraction, self.seed, self.num_folds, self.fold)
        all_samples = [s for samples in index.splits.values() for s in samples]
        decoded = decode_files([s.path for s in all_samples], self.cache_size, self.cache_dir)
        for path, reason in decoded.failures.items():
            log.warning("Skipping %s: %s", path, reason)
        self.splits = {
            split: [s for s in samples if s.path in decoded.images] for split, samples in index.splits.items()
        }
        self.index, self.decoded = index, decoded
        self._write_report()
        self._check_splits()

    def _check_splits(self) -> None:
        classes = self.classes
        if self.positive_class not in classes:
            raise UserError(
                f"data.positive_class={self.positive_class!r} is not a class in {self.root} "
                f"(classes: {', '.join(classes)}); set data.positive_class to one of them."
            )
        for split in ("train", "val"):
            labels = {s.label for s in self.splits.get(split, [])}
            if not labels:
                raise UserError(
                    f"The {split} split of {self.root} has no readable images (see {self.report_path})."
                )
        train_labels = {s.label for s in self.splits["train"]}
        if len(train_labels) < 2:
            raise UserError(
                f"The train split of {self.root} has only the class {train_labels.pop()!r}; training needs "
                "images of at least two classes."
            )
        missing = set(classes) - train_labels
        if missing:
            raise UserError(
                f"Classes {sorted(missing)} have no training images in {self.root}; add some or remove them."
            )

    def _write_report(self) -> None:
        assert self.index is not None and self.decoded is not None
        by_digest: dict[str, list[tuple[str, Path]]] = {}
        for split, samples in self.splits.items():
            for s in samples:
                by_digest.setdefault(self.decoded.digests[s.path], []).append((split, s.path))
        duplicates = [
            [{"split": split, "path": str(path)} for split, path in entries]
            for entries in by_digest.values()
            if len({split for split, _ in entries}) > 1
        ]
        for entries in duplicates:
            log.warning(
                "Identical files in different splits (leakage): %s", ", ".join(e["path"] for e in entries)
            )
        report = {
            "root": str(self.root),
            "layout": self.index.layout,
            "classes": self.classes,
            "positive_class": self.positive_class,
            "folds": {"num_folds": self.num_folds, "fold": self.fold} if self.num_folds else None,
            "counts": {
                split: dict(sorted(Counter(s.label for s in samples).items()))
                for split, samples in self.splits.items()
            },
            "skipped": [{"path": str(p), "reason": r} for p, r in self.decoded.failures.items()],
            "ignored": self.index.ignored,
            "duplicates_across_splits": duplicates,
        }
        self.report = report
        if self.report_path is not None:
            write_json_atomic(self.report_path, report)

    # ---- what the model needs to know ---------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return sorted({s.label for samples in self.splits.values() for s in samples})

    @property
    def class_weights(self) -> list[float] | None:
        """Inverse-frequency weights for the loss when `balance=loss`, else None."""
        if self.balance != "loss":
            return None
        counts = Counter(s.label for s in self.splits["train"])
        total = sum(counts.values())
        return [total / (len(self.classes) * counts[c]) for c in self.classes]

    def has_split(self, split: str) -> bool:
        return bool(self.splits.get(split))

    # ---- loaders --------------------------------------------------------------------------
    def _dataset(self, split: str, transform: Callable[..., dict]) -> DecodedImageDataset:
        assert self.decoded is not None, "call setup() first"
        samples = self.splits[split]
        class_to_idx = {c: i for i, c in enumerate(self.classes)}
        return DecodedImageDataset(
            [self.decoded.images[s.path] for s in samples],
            [class_to_idx[s.label] for s in samples],
            transform,
        )

    def _loader(self, dataset: Dataset, shuffle: bool = False, sampler: Any = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=seed_worker if self.num_workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train", self.train_transform)
        if self.balance != "sampler":
            return self._loader(dataset, shuffle=True)
        counts = Counter(dataset.targets)
        weights = torch.tensor([1.0 / counts[t] for t in dataset.targets], dtype=torch.double)
        sampler = WeightedRandomSampler(weights, len(weights), generator=self._sampler_generator)
        return self._loader(dataset, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", self.eval_transform))

    def test_dataloader(self) -> DataLoader:
        if not self.has_split("test"):
            raise UserError(f"{self.root} has no Test split to evaluate.")
        return self._loader(self._dataset("test", self.eval_transform))

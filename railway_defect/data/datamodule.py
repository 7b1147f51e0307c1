"""RailwayDataModule: discovers the data, decodes every image once (into memory, or for data that
outgrow memory into LitData chunks on disk: data.storage), reports what it skipped, and serves
augmented training batches and deterministic evaluation batches, made by CPU workers or, from JPEG
bytes, on the trainer's device (data.decode: data.device)."""

from __future__ import annotations

import itertools
import logging
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from railway_defect.data.audit import audit_and_warn
from railway_defect.data.backends import MemoryBackend, StreamBackend
from railway_defect.data.device import (
    DeviceItems,
    DevicePlan,
    EncodedBatch,
    UnsupportedOnDevice,
    collate_encoded,
    decode_on,
    render,
    resolve_decode,
)
from railway_defect.data.discovery import (
    REFIT,
    TRAIN_AND_VAL,
    DatasetIndex,
    Sample,
    discover,
    held_out_test_folds,
)
from railway_defect.data.download import download_and_extract
from railway_defect.data.images import DecodedImages
from railway_defect.data.labels import read_labels
from railway_defect.data.settings import DataSettings
from railway_defect.data.splits import read_split_record, write_split_record
from railway_defect.data.storage import choose_storage
from railway_defect.data.strata import image_size_strata
from railway_defect.data.table import SampleTable, label_codes, label_counts
from railway_defect.data.transforms import build_transform
from railway_defect.utils.errors import UserError
from railway_defect.utils.outputs import write_json_atomic
from railway_defect.utils.paths import DATA_DIR_ENV, data_root_candidates
from railway_defect.utils.resources import available_cpus
from railway_defect.utils.seeding import epoch_seed

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# the data report and the log list this many problems of each kind, then a count
REPORT_LIMIT = 100
# the modes that draw training images by weight (random access, EpochSampler)
SAMPLED_MODES = ("sampler", "stratum")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DecodedImageDataset(Dataset):
    """Already-decoded images (arrays, or the device path's JPEG bytes) + integer targets; only the
    transform runs per item (the device path's: its bytes and random parameters, data.device).

    Training keys are `(index, epoch)` (from EpochSampler): the augmentation of a sample is then
    seeded by (seed, epoch, index) alone, the same in any worker and after any resume."""

    def __init__(
        self,
        images: Sequence[np.ndarray],
        targets: Sequence[int],
        transform: Callable[..., dict],
        seed: int = 0,
    ):
        # a list of arrays (memory), or a lazy sequence that reads them from disk (stream)
        self.images = images if isinstance(images, Sequence) else list(images)
        self.targets, self.transform, self.seed = list(targets), transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, epoch = key
            self.transform.set_random_seed(epoch_seed(self.seed, epoch) ^ (index * 2_654_435_761 % 2**32))
        else:
            index = key
        return self.transform(image=self.images[index])["image"], self.targets[index]


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffles (or draws class-balanced, with `weights`) from a generator seeded by (seed, epoch)
    when iteration starts, and yields (index, epoch): an epoch's order and augmentations never
    depend on what ran before it, so a resumed run repeats the uninterrupted one exactly."""

    def __init__(
        self, num_samples: int, seed: int, epoch: Callable[[], int], weights: torch.Tensor | None = None
    ):
        self.num_samples, self.seed, self.epoch, self.weights = num_samples, seed, epoch, weights

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch()
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        if self.weights is None:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        yield from ((index, epoch) for index in order.tolist())


def default_num_workers() -> int:
    """Images are decoded once up front, so workers only run augmentation: on 2 cores the model
    needs both, and worker processes cost more than they save."""
    cpus = available_cpus()
    return 0 if cpus <= 2 else min(8, cpus // 2)


class RailwayDataModule(LightningDataModule):
    """The labelled photos under `settings.root` (split folders, class folders or a manifest),
    decoded once. `settings`: every data.* key (data.settings.DataSettings);
    `train_transforms`, `mean`, `std`: the training augmentations and the backbone's
    normalisation. From Hydra or keywords: `RailwayDataModule.from_settings(root=..., ...)`."""

    def __init__(
        self,
        settings: DataSettings,
        train_transforms: Sequence[Any] = (),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        c = self.settings = settings
        self.root = Path(c.root).expanduser()
        self.positive_class, self.ordinal = c.positive_class, c.ordinal
        self.url, self.sha256 = c.url, c.sha256
        self.val_fraction, self.seed, self.num_folds, self.fold = c.val_fraction, c.seed, c.num_folds, c.fold
        self.split_seed = c.seed if c.split_seed is None else c.split_seed
        self.group_window_s = c.group_window_s
        self.test_holdouts = held_out_test_folds(
            c.test_fraction, c.outer_folds, c.outer_fold, self.split_seed
        )
        # the refit of a cross-validation trains on the whole pool, as train_and_val does
        self.train_on = TRAIN_AND_VAL if c.fold == REFIT else c.train_on
        self.balance, self.batch_size = c.balance, c.batch_size
        self.image_size, self.cache_size, self.harmonize = c.image_size, c.cache_size, c.harmonize
        self.cache_dir = Path(c.cache_dir) if c.cache_dir else None
        self.max_pixels = c.max_pixels
        self.num_workers = default_num_workers() if c.num_workers is None else c.num_workers
        self.report_path = Path(c.report_path) if c.report_path else None
        # where this run records its split membership, and a record to reuse instead of splitting
        self.splits_path = Path(c.splits_path) if c.splits_path else None
        self.splits_from = Path(c.splits_from) if c.splits_from else None
        self.audit = c.audit
        self.augmentations, self.mean, self.std = list(train_transforms), tuple(mean), tuple(std)
        self.train_transform = build_transform(self.augmentations, c.image_size, mean, std, seed=c.seed)
        self.eval_transform = build_transform([], c.image_size, mean, std)
        # `cpu` or `gpu` once set up (data.decode resolved: data.device), and the device type that
        # resolution assumes when setup() runs before a trainer is attached (training/run.py sets it)
        self.decode_used: str | None = None
        self.device_type = "cpu"
        self.index: DatasetIndex | None = None
        self.decoded: DecodedImages | None = None
        self.storage = c.storage
        # local folder or s3:// URL of the optimized splits (data.storage=stream)
        self.stream_dir = (
            str(c.stream_dir) if c.stream_dir else str(Path.home() / ".cache" / "railway_stream")
        )
        # where the decoded images live, once set up (data.backends)
        self.backend: MemoryBackend | StreamBackend | None = None
        # lists of Samples (memory), or compact SampleTables (stream)
        self.splits: dict[str, Sequence[Sample]] = {}
        self._epochs_iterated = 0

    @classmethod
    def from_settings(
        cls,
        train_transforms: Sequence[Any] = (),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **settings: Any,
    ) -> RailwayDataModule:
        """The module for data.* keys given one by one (conf/data/railway.yaml's `_target_`)."""
        return cls(DataSettings(**settings), train_transforms, mean, std)

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
        expected: dict[Path, str] = {}
        if self.splits_from is not None:
            recorded, expected = read_split_record(self.splits_from, self.root)
            index = DatasetIndex(layout=f"recorded in {self.splits_from}", splits=recorded)
        else:
            labels = read_labels(self.settings.labels, self.root) if self.settings.labels else None
            index = discover(
                self.root,
                self.val_fraction,
                self.split_seed,
                self.num_folds,
                self.fold,
                self.train_on,
                self.group_window_s,
                self.test_holdouts,
                labels,
            )
        plan = self._device_path(len(index.splits.get("train", [])))
        self.decode_used = "cpu" if plan is None else "gpu"
        if plan is not None:
            self.train_transform = DeviceItems(plan, seed=self.seed)
            self.eval_transform = DeviceItems(DevicePlan(self.image_size))
        self.backend = self._backend(index)
        recorded = (self.splits_from, expected) if self.splits_from is not None else None
        self.splits, decoded = self.backend.load(index, recorded)
        self._log_skipped(decoded.failures)
        self.index, self.decoded = index, decoded
        if self.splits_path is not None:
            digests = {split: self._digests(split) for split in self.splits}
            write_split_record(self.splits_path, self.root, self.splits, digests)
        self._write_report()
        self._check_splits()

    def _backend(self, index: DatasetIndex) -> MemoryBackend | StreamBackend:
        """data.storage, with `auto` resolved from the image headers and the available memory."""
        storage, encoded = self.storage, self.decode_used == "gpu"
        if storage == "auto":
            paths = [s.path for samples in index.splits.values() for s in samples]
            storage = choose_storage(storage, paths, self.cache_size, self.harmonize, encoded)
        return (
            StreamBackend(self.settings, self.stream_dir, encoded)
            if storage == "stream"
            else MemoryBackend(self.settings, encoded)
        )

    def _device_path(self, train_images: int) -> DevicePlan | None:
        """The device's plan of the augmentations when data.decode resolves to gpu (`auto`: for the
        trainer's device, the training set's size and the augmentation list), else None."""
        try:
            plan, plan_error = DevicePlan.from_transforms(self.augmentations, self.image_size), None
        except UnsupportedOnDevice as e:
            plan, plan_error = None, str(e)
        try:
            decode = resolve_decode(self.settings.decode, self._device_type(), train_images, plan_error)
        except UnsupportedOnDevice as e:
            raise UserError(f"{e}.") from None
        return plan if decode == "gpu" else None

    def _device_type(self) -> str:
        """The trainer's device type, else `device_type`."""
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device.type if trainer is not None else self.device_type

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """data.decode=gpu: the batch's JPEG bytes decoded onto `device` and made into the model's
        input there (data.device.render); any other batch is moved as Lightning moves it."""
        if not isinstance(batch, EncodedBatch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        images = render(decode_on(batch.data, device), batch.params, self.image_size, self.mean, self.std)
        return images, batch.targets.to(device, non_blocking=True)

    @property
    def storage_used(self) -> str | None:
        """`memory` or `stream` once set up."""
        return self.backend.name if self.backend is not None else None

    @property
    def streams(self) -> dict[str, tuple[str, array[int]]]:
        """Per split, the optimized folder and stored positions (data.storage=stream), else empty."""
        return self.backend.streams if isinstance(self.backend, StreamBackend) else {}

    def _digests(self, split: str) -> Iterator[str]:
        """The content digests of a split's samples, in order."""
        samples = self.splits[split]
        if isinstance(samples, SampleTable) and samples.digests is not None:
            return (d.decode() for d in samples.digests)
        assert self.decoded is not None
        return (self.decoded.digests.get(s.path, "") for s in samples)

    def _digest_column(self, split: str) -> np.ndarray:
        """A split's content digests as fixed-width bytes (a SampleTable already holds them so)."""
        samples = self.splits[split]
        if isinstance(samples, SampleTable) and samples.digests is not None:
            return samples.digests
        return np.array([d.encode() for d in self._digests(split)], dtype="S")

    def _duplicates_across_splits(self) -> list[list[dict[str, str]]]:
        """Files with identical content in more than one split (leakage), in order of first
        appearance, found on a column of digests (no dict entry per file)."""
        names = list(self.splits)
        digests = np.concatenate([self._digest_column(split) for split in names] or [np.zeros(0, "S1")])
        split_ids = np.repeat(np.arange(len(names)), [len(self.splits[n]) for n in names])
        rows = np.concatenate([np.arange(len(self.splits[n])) for n in names] or [np.zeros(0, int)])
        return [
            [
                {"split": names[split_ids[m]], "path": str(self.splits[names[split_ids[m]]][rows[m]].path)}
                for m in members
            ]
            for members in _shared_across_splits(digests, split_ids)
        ]

    @staticmethod
    def _log_skipped(failures: dict[Path, str]) -> None:
        """One warning per skipped file up to REPORT_LIMIT, then a count (data_report.json lists them)."""
        for path, reason in itertools.islice(failures.items(), REPORT_LIMIT):
            log.warning("Skipping %s: %s", path, reason)
        if len(failures) > REPORT_LIMIT:
            log.warning("... and %d more unreadable files.", len(failures) - REPORT_LIMIT)

    def _check_splits(self) -> None:
        found = sorted({label for samples in self.splits.values() for label in label_counts(samples)})
        if self.ordinal is not None and set(self.ordinal) != set(found):
            raise UserError(
                f"data.ordinal={list(self.ordinal)} must name every class of {self.root} once, in order "
                f"(classes found: {', '.join(found)})."
            )
        classes = self.classes
        if self.positive_class not in classes:
            raise UserError(
                f"data.positive_class={self.positive_class!r} is not a class in {self.root} "
                f"(classes: {', '.join(classes)}); set data.positive_class to one of them."
            )
        for split in ("train", "val") if self.train_on == "train" else ("train",):
            labels = set(label_counts(self.splits.get(split, [])))
            if not labels:
                raise UserError(
                    f"The {split} split of {self.root} has no readable images (see {self.report_path})."
                )
        train_labels = set(label_counts(self.splits["train"]))
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
        duplicates = self._duplicates_across_splits()
        for entries in duplicates[:REPORT_LIMIT]:
            log.warning(
                "Identical files in different splits (leakage): %s", ", ".join(e["path"] for e in entries)
            )
        report = {
            "root": str(self.root),
            "layout": self.index.layout,
            "classes": self.classes,
            "ordinal": self.ordinal is not None,
            "positive_class": self.positive_class,
            "folds": {"num_folds": self.num_folds, "fold": self.fold} if self.num_folds else None,
            "group_window_s": self.group_window_s,
            "test_holdouts": [asdict(holdout) for holdout in self.test_holdouts],
            # data.labels: reviewed labels laid over the root's (overrides, added photos, ...)
            "labels": self.index.labels,
            "counts": {
                split: dict(sorted(label_counts(samples).items())) for split, samples in self.splits.items()
            },
            "storage": self.storage_used,
            "decode": self.decode_used,
            # counts, then the first REPORT_LIMIT of each kind: readable for 200,000 files
            "skipped_count": len(self.decoded.failures),
            "skipped": [
                {"path": str(p), "reason": r}
                for p, r in itertools.islice(self.decoded.failures.items(), REPORT_LIMIT)
            ],
            "ignored_count": len(self.index.ignored),
            "ignored_reasons": dict(Counter(entry["reason"] for entry in self.index.ignored).most_common()),
            "ignored": self.index.ignored[:REPORT_LIMIT],
            "duplicates_across_splits_count": len(duplicates),
            "duplicates_across_splits": duplicates[:REPORT_LIMIT],
            # can size, format, compression, folder... of the train + val files predict the label?
            "shortcut_audit": audit_and_warn(
                [*self.splits.get("train", []), *self.splits.get("val", [])], self.root, self.harmonize
            )
            if self.audit
            else None,
        }
        self.report = report
        if self.report_path is not None:
            write_json_atomic(self.report_path, report)

    # ---- what the model needs to know ---------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """The class order of the model's outputs: data.ordinal's, else by name."""
        if self.ordinal is not None:
            return list(self.ordinal)
        return sorted({label for samples in self.splits.values() for label in label_counts(samples)})

    @property
    def class_weights(self) -> list[float] | None:
        """Inverse-frequency weights for the loss when `balance=loss`, else None."""
        if self.balance != "loss":
            return None
        counts = label_counts(self.splits["train"])
        total = sum(counts.values())
        return [total / (len(self.classes) * counts[c]) for c in self.classes]

    def has_split(self, split: str) -> bool:
        return bool(self.splits.get(split))

    # ---- loaders --------------------------------------------------------------------------
    def _dataset(self, split: str, transform: Callable[..., dict]) -> DecodedImageDataset:
        """The split by position: decoded arrays in memory, or read on demand from its optimized
        folder (random access, in split order: evaluation order and DDP sharding as in memory)."""
        assert self.backend is not None, "call setup() first"
        samples = self.splits[split]
        images = self.backend.images(split, samples)
        return DecodedImageDataset(images, label_codes(samples, self.classes).tolist(), transform)

    def _loader(self, dataset: Dataset, shuffle: bool = False, sampler: Any = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory(),
            collate_fn=self._collate(),
            # its own generator: starting an epoch's iterator must not draw from the global RNG,
            # or dropout's random stream would depend on when the iterator was created
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _collate(self) -> Callable[[list], Any] | None:
        """On the device path, bytes and parameter rows (EncodedBatch); else the default."""
        return collate_encoded if self.decode_used == "gpu" else None

    def _pin_memory(self) -> bool:
        """Pinned host memory only speeds up copies to a CUDA device."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else self._epochs_iterated

    def train_dataloader(self) -> DataLoader:
        """Random access through EpochSampler (weighted when balancing by sampler or stratum), or
        the back-end's own sequential reader (streamed chunks) when nothing is weighted."""
        assert self.backend is not None, "call setup() first"
        if self.balance not in SAMPLED_MODES:
            loader = self.backend.train_loader(
                self.train_transform,
                self._next_epoch,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                pin_memory=self._pin_memory(),
                collate_fn=self._collate(),
            )
            if loader is not None:
                return loader
        dataset = self._dataset("train", self.train_transform)
        weights = self._sampling_weights(dataset.targets) if self.balance in SAMPLED_MODES else None
        return self._loader(dataset, sampler=EpochSampler(len(dataset), self.seed, self._next_epoch, weights))

    def _sampling_weights(self, targets: Sequence[int]) -> torch.Tensor:
        """Each training image's chance to be drawn: 1 / the size of its cell, the cells being the
        classes (balance=sampler) or class x image-size stratum (balance=stratum)."""
        cells: list[Any] = list(targets)
        if self.balance == "stratum":
            paths = [str(s.path) for s in self.splits["train"]]
            strata = image_size_strata(paths)
            cells = [(t, strata[p]) for t, p in zip(targets, paths, strict=True)]
            log.info("balance=stratum: training images per class x stratum: %s", dict(Counter(cells)))
        counts = Counter(cells)
        return torch.tensor([1.0 / counts[c] for c in cells], dtype=torch.double)

    def _next_epoch(self) -> int:
        """The trainer's epoch; outside a trainer, each new iteration is the next epoch."""
        epoch = self._current_epoch()
        self._epochs_iterated += 1
        return epoch

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_split("val"):  # data.train_on=train_and_val: Lightning skips validation
            return []
        return self._loader(self._dataset("val", self.eval_transform))

    def test_dataloader(self) -> DataLoader:
        if not self.has_split("test"):
            raise UserError(f"{self.root} has no Test split to evaluate.")
        return self._loader(self._dataset("test", self.eval_transform))


def _shared_across_splits(digests: np.ndarray, split_ids: np.ndarray) -> list[np.ndarray]:
    """Positions of each digest that occurs in more than one split, in order of first appearance."""
    if not len(digests):
        return []
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    spread = np.bincount(np.unique(inverse * (split_ids.max() + 1) + split_ids) // (split_ids.max() + 1))
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(inverse))])
    shared = sorted(np.flatnonzero(spread > 1), key=lambda g: first[g])
    return [order[starts[g] : starts[g + 1]] for g in shared]

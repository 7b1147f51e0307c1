"""Where a run's decoded images live, behind one small interface chosen once per run (data.storage):
`MemoryBackend` decodes every image into RAM; `StreamBackend` decodes each split once into LitData
chunks on disk (or object storage) and keeps only compact columns in memory. The data module asks
a back-end for its splits, a split's images by position, and (streaming only) a training loader
that reads the chunks in order. For the device path (data.decode=gpu) both keep each decoded image
as JPEG bytes (data.device.EncodedImage) instead of its pixels."""

from __future__ import annotations

import functools
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from railway_defect.data.device import EncodedImage, encode_all
from railway_defect.data.discovery import DatasetIndex, Sample
from railway_defect.data.images import DecodedImages, decode_files
from railway_defect.data.settings import DataSettings
from railway_defect.data.splits import check_unchanged
from railway_defect.data.table import SampleTable, label_codes, label_counts, to_tables
from railway_defect.utils.errors import UserError

Splits = dict[str, Sequence[Sample]]
# a record to compare the files with: (splits.csv, its digests), or None
Recorded = tuple[Path, dict[Path, str]] | None


# data.decode=gpu in memory: images decoded this many at a time, then kept as JPEG bytes
ENCODE_CHUNK = 1024


class MemoryBackend:
    """Every image decoded into RAM: the fastest form while it fits."""

    name = "memory"

    def __init__(self, settings: DataSettings, encoded: bool = False):
        """`encoded`: keep each image as JPEG bytes for the device path (data.decode=gpu)."""
        self.settings, self.encoded = settings, encoded
        self.decoded = DecodedImages()
        self.jpegs: dict[Path, EncodedImage] = {}

    def load(self, index: DatasetIndex, recorded: Recorded) -> tuple[Splits, DecodedImages]:
        """The readable samples of each split, and what decoding found (images, digests, failures)."""
        paths = [s.path for samples in index.splits.values() for s in samples]
        self.decoded = self._decode(paths)
        if recorded is not None:
            check_unchanged(recorded[0], recorded[1], self.decoded.digests)
        kept = {
            split: [s for s in samples if s.path in self.decoded.digests]
            for split, samples in index.splits.items()
        }
        return kept, self.decoded

    def _decode(self, paths: list[Path]) -> DecodedImages:
        """Every file decoded; `encoded`: kept as JPEG bytes (about a fifth of the pixels' memory),
        ENCODE_CHUNK arrays at a time."""
        c = self.settings
        cache_dir = Path(c.cache_dir) if c.cache_dir else None
        decode = functools.partial(
            decode_files,
            min_side=c.cache_size,
            cache_dir=cache_dir,
            max_pixels=c.max_pixels,
            mode=c.harmonize,
        )
        if not self.encoded:
            return decode(paths)
        decoded = DecodedImages()
        for start in range(0, len(paths), ENCODE_CHUNK):
            chunk = decode(paths[start : start + ENCODE_CHUNK])
            self.jpegs.update(encode_all(chunk.images))
            decoded.failures.update(chunk.failures)
            decoded.digests.update(chunk.digests)
        return decoded

    def images(self, split: str, samples: Sequence[Sample]) -> Sequence[np.ndarray | EncodedImage]:
        if self.encoded:
            return [self.jpegs[s.path] for s in samples]
        return [self.decoded.images[s.path] for s in samples]

    def train_loader(
        self, transform: Callable[..., dict], next_epoch: Callable[[], int], **loader: Any
    ) -> None:
        """None: training reads by position like the other splits (EpochSampler)."""
        return None


class StreamBackend:
    """Each split decoded once into its optimized folder (reused when its key matches); in memory
    only compact columns stay (SampleTable: paths, label codes, groups, digests), so memory does
    not grow with the number of images by more than their paths."""

    name = "stream"

    def __init__(self, settings: DataSettings, stream_dir: str, encoded: bool = False):
        """`encoded`: chunks of JPEG bytes for the device path (data.decode=gpu)."""
        self.settings, self.stream_dir, self.encoded = settings, stream_dir, encoded
        # per split: the optimized folder and the stored position of each kept row
        self.streams: dict[str, tuple[str, array[int]]] = {}

    def load(self, index: DatasetIndex, recorded: Recorded) -> tuple[Splits, DecodedImages]:
        from railway_defect.data.streaming import digest_files

        to_tables(index.splits)
        failures: dict[Path, str] = {}
        for table in index.splits.values():
            table.digests, unreadable = digest_files(table.paths)
            failures.update((Path(table.paths[i]), reason) for i, reason in unreadable.items())
        if recorded is not None:
            check_unchanged(recorded[0], recorded[1], _readable_digests(index))
        classes = sorted(
            {label for table in index.splits.values() for label in label_counts(_readable(table))}
        )
        splits: Splits = {}
        for split, table in index.splits.items():
            splits[split] = self._stream_split(split, _readable(table), classes, failures)
        found = sorted({label for samples in splits.values() for label in label_counts(samples)})
        if found != classes:  # the stored targets index the classes of the key
            raise UserError(
                f"Classes {sorted(set(classes) - set(found))} have no readable images in "
                f"{self.settings.root}."
            )
        return splits, DecodedImages(failures=failures)  # the digests are a column of each SampleTable

    def _stream_split(
        self, split: str, readable: SampleTable, classes: list[str], failures: dict[Path, str]
    ) -> SampleTable:
        """One split's optimized folder; returns the rows of its decodable files."""
        from railway_defect.data.streaming import build_split, split_key, storage_order

        c = self.settings
        targets = label_codes(readable, classes)
        assert readable.digests is not None
        items = zip((d.decode() for d in readable.digests), map(int, targets), strict=True)
        key = split_key(items, classes, c.cache_size, c.harmonize, c.max_pixels, self.encoded)
        location, meta = build_split(
            self.stream_dir,
            readable.paths,
            targets,
            key,
            c.cache_size,
            c.max_pixels,
            c.harmonize,
            self.encoded,
        )
        kept = np.ones(len(readable), dtype=bool)
        for position, reason in meta["failures"].items():
            failures[Path(readable.paths[int(position)])] = reason
            kept[int(position)] = False
        stored_at = np.argsort(storage_order(key, len(readable)))
        self.streams[split] = (location, array("q", stored_at[kept].astype(np.int64).tobytes()))
        return readable if kept.all() else readable.take(np.flatnonzero(kept))

    def images(self, split: str, samples: Sequence[Sample]) -> Sequence[np.ndarray]:
        """Read on demand from the split's optimized folder (random access, in split order:
        evaluation order and DDP sharding as in memory)."""
        from railway_defect.data.streaming import StreamedImages

        return StreamedImages(*self.streams[split])

    def train_loader(
        self, transform: Callable[..., dict], next_epoch: Callable[[], int], **loader: Any
    ) -> DataLoader:
        """LitData's StreamingDataLoader over the training chunks: reads stay sequential within a
        chunk (fast from a disk or object storage) and each DDP rank streams its own chunks. Order
        comes from LitData's shuffle seeded by (seed, trainer epoch); augmentation is seeded per
        (seed, epoch, image) as in memory mode."""
        from railway_defect.data.streaming import AugmentedStream, TrainerEpochLoader

        location, _ = self.streams["train"]
        dataset = AugmentedStream(location, transform, self.settings.seed)
        return TrainerEpochLoader(dataset, next_epoch, **loader)


def _readable(table: SampleTable) -> SampleTable:
    """The rows of `table` whose file could be read (those with a content digest)."""
    assert table.digests is not None
    readable = table.digests != b""
    return table if readable.all() else table.take(np.flatnonzero(readable))


def _readable_digests(index: DatasetIndex) -> dict[Path, str]:
    """Path -> digest of the readable files (only to compare them with a recorded run)."""
    return {
        Path(table.paths[i]): digest.decode()
        for table in index.splits.values()
        for i, digest in enumerate(table.digests)
        if digest
    }

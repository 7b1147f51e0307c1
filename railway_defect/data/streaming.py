"""Data sets larger than memory: each split decoded once into LitData chunks on disk (or object
storage), keyed by the content of its images and the decode settings, and streamed from there.

A split's optimized folder is named by a digest of (format version, cache_size, harmonize,
max_pixels, classes, and the content digest + class of every image in split order): every run,
sweep job and DDP rank with the same data and settings reuses it; anything else builds a new one
beside it. Items are stored in a fixed random order (`storage_order`, from the key): split folders
list classes one after another, and LitData shuffles chunks and items within a chunk, so stored in
split order every chunk (and batch) would hold one class. Files that fail to decode are kept as
empty placeholders (and listed in the folder's `railway_stream.json`) so positions never shift.

Building runs `litdata.optimize` on every CPU with its progress bar and checkpoints
(`use_checkpoint`): an interrupted build resumes where it stopped when the same folder is asked for
again. A file lock makes concurrent jobs wait for one builder instead of racing."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, optimize

from railway_defect.data.device import STORED_QUALITY, EncodedImage, encode_image
from railway_defect.data.images import DecodeError, content_digest, load_image_file
from railway_defect.utils.outputs import write_json_atomic
from railway_defect.utils.resources import available_cpus
from railway_defect.utils.seeding import epoch_seed

log = logging.getLogger(__name__)

# bump when the item layout or the decoding changes: old folders are then never reused
FORMAT_VERSION = 1
META_NAME = "railway_stream.json"
CHUNK_BYTES = "64MB"
# hex characters of a content digest, and files read per thread task
DIGEST_CHARS = len(content_digest(b""))
DIGEST_BATCH = 256


def is_remote(location: str | Path) -> bool:
    return "://" in str(location)


# ---- keys ----------------------------------------------------------------------------------
def _digest_batch(paths: Sequence[str | Path]) -> list[tuple[bytes, str]]:
    """(hex digest, "") per readable file, (b"", reason) per unreadable one."""
    results = []
    for path in paths:
        try:
            results.append((content_digest(Path(path).read_bytes()).encode(), ""))
        except OSError as e:
            results.append((b"", f"cannot read file ({e.strerror or e})"))
    return results


def digest_files(
    paths: Sequence[str | Path], workers: int | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """Content digests of `paths` as a column of hex bytes (b"" where unreadable), read in threads
    a batch at a time (nothing decoded; one future per batch, not per file), and the unreadable
    files by position with their reasons."""
    from concurrent.futures import ThreadPoolExecutor

    digests = np.zeros(len(paths), dtype=f"S{DIGEST_CHARS}")
    failures: dict[int, str] = {}
    batches = range(0, len(paths), DIGEST_BATCH)
    with ThreadPoolExecutor(max_workers=workers or available_cpus()) as pool:
        done = pool.map(lambda start: _digest_batch(paths[start : start + DIGEST_BATCH]), batches)
        for start, results in zip(batches, done, strict=True):
            for i, (digest, reason) in enumerate(results, start):
                digests[i] = digest
                if reason:
                    failures[i] = reason
    return digests, failures


def split_key(
    items: Iterable[tuple[str, int]],
    classes: Sequence[str],
    cache_size: int,
    harmonize: str,
    max_pixels: int,
    encoded: bool = False,
) -> str:
    """The name of a split's optimized folder: every input of its content, nothing else (paths
    are left out: moving the data folder reuses the build). `encoded`: JPEG bytes for the device
    path (data.decode=gpu) instead of arrays."""
    h = hashlib.blake2b(digest_size=16)
    settings = {
        "version": FORMAT_VERSION,
        "cache_size": cache_size,
        "harmonize": harmonize,
        "max_pixels": max_pixels,
        "classes": list(classes),
        **({"encoded": f"jpeg{STORED_QUALITY}"} if encoded else {}),
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for digest, target in items:
        h.update(f"\n{digest} {target}".encode())
    return h.hexdigest()


# ---- building ------------------------------------------------------------------------------
def storage_order(key: str, count: int) -> np.ndarray:
    """The split positions in the order they are stored: a permutation seeded by the key."""
    return np.random.default_rng(int(key[:16], 16)).permutation(count)


def _decode_item(
    item: list[Any], min_side: int, max_pixels: int, mode: str, failure_dir: str, encoded: bool = False
) -> dict[str, Any]:
    """One optimize input -> one stored item (`encoded`: its JPEG bytes and size, for the device
    path); a file that fails to decode becomes an empty placeholder (positions must not shift) and
    its reason is written to `failure_dir`."""
    index, path, target = item
    try:
        image, _ = load_image_file(Path(path), min_side, None, max_pixels, mode)
        error = ""
    except DecodeError as e:
        image, error = np.zeros((0, 0, 3), dtype=np.uint8), str(e) or "unreadable"
        Path(failure_dir, f"{index}.txt").write_text(error)
    stored = {"index": index, "target": target, "image": image, "error": error}
    if encoded:
        jpeg = encode_image(image) if not error else EncodedImage(np.zeros(0, np.uint8), 0, 0)
        stored.update(image=jpeg.data, height=jpeg.height, width=jpeg.width)
    return stored


def stored_image(item: dict[str, Any]) -> np.ndarray | EncodedImage:
    """A stored item's image: an array, or the device path's JPEG bytes with their size."""
    if "height" in item:
        return EncodedImage(item["image"], int(item["height"]), int(item["width"]))
    return item["image"]


def _read_meta(location: str) -> dict[str, Any] | None:
    """The completion record of an optimized folder, or None when it was never finished."""
    try:
        if is_remote(location):
            from litdata.streaming.fs_provider import _get_fs_provider

            target = f"{location.rstrip('/')}/{META_NAME}"
            fs = _get_fs_provider(target)
            if not fs.exists(target):
                return None
            with tempfile.TemporaryDirectory() as tmp:
                fs.download_file(target, f"{tmp}/{META_NAME}")
                return json.loads(Path(tmp, META_NAME).read_text())
        return json.loads(Path(location, META_NAME).read_text())
    except (OSError, ValueError):
        return None


def _write_meta(location: str, meta: dict[str, Any]) -> None:
    """The build's record, written last: its presence means the build is complete."""
    if not is_remote(location):
        write_json_atomic(Path(location, META_NAME), meta)
        return
    from litdata.streaming.fs_provider import _get_fs_provider

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, META_NAME)
        local.write_text(json.dumps(meta, indent=1))
        target = f"{location.rstrip('/')}/{META_NAME}"
        _get_fs_provider(target).upload_file(str(local), target)


class _BuildLock:
    """An exclusive lock for building one key: other jobs and DDP ranks wait, then reuse."""

    def __init__(self, stream_dir: str, key: str):
        from filelock import FileLock

        folder = (
            Path(tempfile.gettempdir(), "railway_stream_locks") if is_remote(stream_dir) else Path(stream_dir)
        )
        folder.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(folder / f".{key}.lock"))

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


# LitData's optimize empties two fixed folders under the temp dir (chunks/, data/) before every
# build and merges remote uploads and indexes there: two builds at once would clear each other's
OPTIMIZER_FOLDERS = {"DATA_OPTIMIZER_CACHE_FOLDER": "chunks", "DATA_OPTIMIZER_DATA_CACHE_FOLDER": "data"}


@contextmanager
def _private_optimizer_folders() -> Iterator[None]:
    """LitData's working folders for one build, removed after it (unless the user set them)."""
    unset = [name for name in OPTIMIZER_FOLDERS if name not in os.environ]
    with tempfile.TemporaryDirectory(prefix="railway_optimize_") as folder:
        os.environ.update({name: os.path.join(folder, OPTIMIZER_FOLDERS[name]) for name in unset})
        try:
            yield
        finally:
            for name in unset:
                os.environ.pop(name, None)


def _run_optimize(build: Callable[[], Any], location: str, failure_dir: Path) -> None:
    """LitData's optimize, resumable; a checkpoint left by a build on another number of CPUs cannot
    be resumed, so that (local) build starts again."""
    try:
        build()
    except ValueError as e:
        if "checkpoint" not in str(e).lower() or is_remote(location):
            raise
        log.warning("Cannot resume the interrupted build of %s (%s): building it again.", location, e)
        shutil.rmtree(location)
        failure_dir.mkdir(parents=True)
        build()


def _build(
    location: str, key: str, paths: Sequence[str | Path], targets: Sequence[int], decode: Any, workers: int
) -> tuple[dict[int, str], Path]:
    """Decode the split into chunks under `location`; returns the failures by split position and
    the folder that holds them until the build's record is written."""
    # failures survive an interruption with the checkpoints: they live beside the chunks
    work = Path(tempfile.gettempdir(), "railway_stream_build", key) if is_remote(location) else None
    failure_dir = (work or Path(location)) / ".failures"
    failure_dir.mkdir(parents=True, exist_ok=True)
    build = functools.partial(
        optimize,
        fn=functools.partial(decode, failure_dir=str(failure_dir)),
        # lists, not tuples: a resumed build compares them with its checkpoint's JSON
        inputs=[[int(i), str(paths[i]), int(targets[i])] for i in storage_order(key, len(paths))],
        output_dir=location,
        num_workers=workers,
        chunk_bytes=CHUNK_BYTES,
        reorder_files=False,
        keep_data_ordered=True,
        use_checkpoint=True,
        # fork: workers start at once (spawned ones re-import torch, ~10 s each)
        start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn",
        verbose=True,
    )
    with _private_optimizer_folders():
        _run_optimize(build, location, failure_dir)
    return {int(f.stem): f.read_text() for f in failure_dir.glob("*.txt")}, failure_dir


def build_split(
    stream_dir: str,
    paths: Sequence[str | Path],
    targets: Sequence[int],
    key: str,
    min_side: int,
    max_pixels: int,
    mode: str,
    encoded: bool = False,
    num_workers: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """The optimized folder of one split (built unless a finished one with this key exists) and
    its record: {"key", "count", "failures": {split position: reason}}."""
    location = f"{str(stream_dir).rstrip('/')}/{key}"
    meta = _read_meta(location)
    if meta is not None:
        log.info("Reusing the optimized data %s (%d images).", location, meta["count"])
        return location, meta
    with _BuildLock(str(stream_dir), key):
        meta = _read_meta(location)  # built by another job while this one waited
        if meta is not None:
            return location, meta
        workers = max(1, min(num_workers or available_cpus(), len(paths)))
        log.info("Building the optimized data %s: %d images on %d workers.", location, len(paths), workers)
        start = time.perf_counter()
        decode = functools.partial(
            _decode_item, min_side=min_side, max_pixels=max_pixels, mode=mode, encoded=encoded
        )
        failures, failure_dir = _build(location, key, paths, targets, decode, workers)
        meta = {"key": key, "count": len(paths), "failures": {str(k): v for k, v in sorted(failures.items())}}
        _write_meta(location, meta)
        shutil.rmtree(failure_dir, ignore_errors=True)
        log.info("Built %s in %.1f s (%d unreadable).", location, time.perf_counter() - start, len(failures))
        return location, meta


# ---- reading -------------------------------------------------------------------------------
class StreamedImages(Sequence[np.ndarray]):
    """Images of an optimized folder by position, read on demand (random access): what
    DecodedImageDataset indexes in place of a list of decoded arrays. Each process (DataLoader
    worker) opens the folder itself."""

    def __init__(self, location: str, positions: Sequence[int]):
        # 8 bytes a position (a list would hold an int object each), and cheap to pickle to workers
        self.location, self.positions = location, array("q", positions)
        self._dataset: StreamingDataset | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> np.ndarray | EncodedImage:  # type: ignore[override]
        if self._dataset is None:
            self._dataset = StreamingDataset(self.location)
        return stored_image(self._dataset[self.positions[i]])

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None}


class AugmentedStream(StreamingDataset):
    """The training split streamed in LitData's own order: chunks and the items within them are
    shuffled by (seed, epoch); each item's augmentation is seeded by (seed, epoch, index) as in
    memory mode. Placeholders of unreadable files are skipped."""

    def __init__(self, location: str, transform: Callable[..., dict], seed: int):
        super().__init__(location, shuffle=True, seed=seed)
        self.augment, self.augment_seed = transform, seed

    def __next__(self) -> tuple[torch.Tensor, int]:
        item = super().__next__()
        while item["error"]:
            item = super().__next__()
        epoch = self.current_epoch - 1  # the StreamingDataLoader counts epochs from 1
        index_seed = int(item["index"]) * 2_654_435_761 % 2**32
        self.augment.set_random_seed(epoch_seed(self.augment_seed, epoch) ^ index_seed)
        return self.augment(image=stored_image(item))["image"], int(item["target"])


class TrainerEpochLoader(StreamingDataLoader):
    """A StreamingDataLoader whose epoch is the trainer's (not its own count of iterations), so a
    run resumed at epoch k shuffles epoch k as the uninterrupted run did."""

    def __init__(self, dataset: AugmentedStream, epoch: Callable[[], int], **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.epoch = epoch

    def __iter__(self) -> Any:
        if not self.restore:  # a restored mid-epoch state keeps its own epoch
            self.current_epoch = self.epoch()
        return super().__iter__()

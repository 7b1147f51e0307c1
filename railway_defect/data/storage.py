"""`data.storage=auto`: keep decoded images in memory or stream them, from the image headers and
the memory this process can use. Apart from streaming.py, so that runs which keep images in
memory never import LitData: only streaming needs it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from railway_defect.data.images import THUMBNAIL_SIZE
from railway_defect.utils.resources import available_memory

log = logging.getLogger(__name__)

STORAGE_MODES = ("auto", "memory", "stream")
# `auto` keeps images in memory while their decoded size is under this share of the available
# memory: the model, its activations, the loader's batches and the framework need the rest
MEMORY_SHARE = 0.5
# image headers read to estimate the decoded size of a whole data set
ESTIMATE_SAMPLE = 64
# data.decode=gpu keeps JPEG bytes (quality 95) instead of pixels: 0.18 of their size on average
# over 80 photos and sleeper frames at cache size 256 (0.26 at the 95th percentile); this share
# is the estimate's
ENCODED_SHARE = 0.25


def estimate_decoded_bytes(paths: Sequence[Path], cache_size: int, harmonize: str) -> int:
    """Bytes the in-memory cache would hold for `paths`, from the headers of up to ESTIMATE_SAMPLE
    files spread over the list (no pixels decoded)."""
    from PIL import Image

    if not paths:
        return 0
    step = max(1, len(paths) // ESTIMATE_SAMPLE)
    sizes = []
    for path in paths[::step][:ESTIMATE_SAMPLE]:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError, SyntaxError):
            continue
        if harmonize != "none":
            width = height = THUMBNAIL_SIZE
        scale = min(1.0, cache_size / max(1, min(width, height)))
        sizes.append(round(width * scale) * round(height * scale) * 3)
    return int(np.mean(sizes) * len(paths)) if sizes else 0


def choose_storage(
    storage: str, paths: Sequence[Path], cache_size: int, harmonize: str, encoded: bool = False
) -> str:
    """`memory` or `stream` for `data.storage`; `auto` streams when the decoded images (`encoded`:
    their JPEG bytes, data.decode=gpu) would take more than MEMORY_SHARE of the memory this process
    can still use (cgroup limits included)."""
    if storage not in STORAGE_MODES:
        raise ValueError(f"data.storage={storage!r} is not one of {', '.join(STORAGE_MODES)}")
    if storage != "auto":
        return storage
    needed = int(estimate_decoded_bytes(paths, cache_size, harmonize) * (ENCODED_SHARE if encoded else 1))
    free = available_memory()
    if free is None:
        log.info("Available memory unknown: keeping decoded images in memory (data.storage=auto).")
        return "memory"
    choice = "memory" if needed <= MEMORY_SHARE * free else "stream"
    log.info(
        "data.storage=auto: %d images decode to about %.2f GB, %.2f GB of memory available -> %s.",
        len(paths),
        needed / 1e9,
        free / 1e9,
        choice,
    )
    return choice

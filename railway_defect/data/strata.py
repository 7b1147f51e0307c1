"""Strata of storage form: the image size a photo was stored at, when a size is shared by many
photos (the sample data's 224x224 thumbnails), else `other sizes`. Out-of-fold metrics are
reported per stratum, and `data.balance=stratum` gives every (class, stratum) cell the same weight
in training, so that the stratum cannot stand in for the label."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

# a size shared by at least this fraction of the images is a stratum of its own
STRATUM_MIN_FRACTION = 0.2
OTHER_SIZES = "other sizes"


def image_size_strata(paths: Sequence[str | Path]) -> dict[str, str]:
    """Each path's stratum: its WxH when at least STRATUM_MIN_FRACTION of the images share it."""
    sizes: dict[str, str] = {}
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes[str(path)] = "{}x{}".format(*image.size)
        except OSError:
            sizes[str(path)] = "unreadable"
    counts = Counter(sizes.values())
    common = {s for s, n in counts.items() if n >= STRATUM_MIN_FRACTION * len(paths)}
    return {p: (s if s in common else OTHER_SIZES) for p, s in sizes.items()}

"""Decode each image once, at a small size, and keep it: full-resolution camera photos
(4000x3000, several MB) would otherwise dominate every epoch on a CPU."""

from __future__ import annotations

import hashlib
import io
import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from railway_defect.utils.outputs import atomic_open
from railway_defect.utils.resources import available_cpus

log = logging.getLogger(__name__)

_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
# decompression-bomb guard: a 4000x3000 camera photo is 12 Mpx; refuse anything above this
DEFAULT_MAX_PIXELS = 100_000_000
# the guard below replaces PIL's own warning for large images
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class DecodeError(Exception):
    """The file is not a readable image; the message says why."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit scaled down, transparency composited on white."""
    if image.mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def shrink(image: Image.Image, min_side: int) -> Image.Image:
    """`image` resized (bilinear) so that its shorter side is at most `min_side`."""
    width, height = image.size
    if min(width, height) <= min_side:
        return image
    scale = min_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


# data.harmonize: one storage form for every image before anything else sees it, so that how a
# photo was stored (size, aspect, JPEG re-compression) cannot tell the model its label.
# `thumbnail`: squashed to 224x224 and re-encoded as JPEG quality 95, the form of the public
# data set's 224x224 variant (and of most photos in use).
HARMONIZE_MODES = ("none", "thumbnail")
THUMBNAIL_SIZE = 224
THUMBNAIL_QUALITY = 95


def check_harmonize(mode: str) -> str:
    if mode not in HARMONIZE_MODES:
        raise ValueError(f"data.harmonize={mode!r} is not one of {', '.join(HARMONIZE_MODES)}")
    return mode


def harmonize(image: Image.Image, mode: str) -> Image.Image:
    """`image` (RGB) in the storage form `mode` (see HARMONIZE_MODES)."""
    if check_harmonize(mode) == "none":
        return image
    image = image.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    with Image.open(buffer) as encoded:
        return encoded.convert("RGB")


def prepare(image: Image.Image, min_side: int, mode: str = "none") -> np.ndarray:
    """A decoded RGB image as training caches it: harmonized, then shrunk to `min_side`."""
    return np.array(shrink(harmonize(image, mode), min_side), dtype=np.uint8)


def decode_image(
    data: bytes, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS, mode: str = "none"
) -> np.ndarray:
    """Bytes of an image file to an RGB uint8 array in storage form `mode` (data.harmonize) whose
    shorter side is at most `min_side`."""
    if not data:
        raise DecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise DecodeError(
                    f"{width}x{height} is {width * height / 1e6:.0f} Mpx, above the decompression-bomb guard "
                    f"data.max_pixels={max_pixels}; downscale the file or raise data.max_pixels"
                )
            # JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale directly (never below what is kept)
            draft = min_side if mode == "none" else max(min_side, THUMBNAIL_SIZE)
            image.draft("RGB", (draft, draft))
            image = _to_rgb(ImageOps.exif_transpose(image))
        return prepare(image, min_side, mode)
    except UnidentifiedImageError as e:  # its message names an in-memory buffer, not the file
        raise DecodeError("cannot identify image file (not an image, or a format PIL cannot read)") from e
    except Image.DecompressionBombError as e:
        raise DecodeError(f"too many pixels to decode safely ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(str(e) or type(e).__name__) from e


def content_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _atomic_save_npy(array: np.ndarray, target: Path) -> None:
    with atomic_open(target, "wb") as f:
        np.save(f, array)


def load_image_file(
    path: Path,
    min_side: int,
    cache_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mode: str = "none",
) -> tuple[np.ndarray, str]:
    """Decode one file (or read it from the on-disk cache keyed by its content); returns (image, digest)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DecodeError(f"cannot read file ({e.strerror or e})") from e
    digest = content_digest(data)
    key = f"{digest}-{min_side}" + ("" if mode == "none" else f"-{mode}")
    cached = Path(cache_dir) / f"{key}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        try:
            return np.load(cached), digest
        except (OSError, ValueError):
            log.warning("Ignoring unreadable cache entry %s", cached)
    image = decode_image(data, min_side, max_pixels, mode)
    if cached is not None:
        _atomic_save_npy(image, cached)
    return image, digest


@dataclass
class DecodedImages:
    """Decoded images by path, the files that failed with their reasons, and content digests."""

    images: dict[Path, np.ndarray] = field(default_factory=dict)
    failures: dict[Path, str] = field(default_factory=dict)
    digests: dict[Path, str] = field(default_factory=dict)


def decode_files(
    paths: list[Path],
    min_side: int,
    cache_dir: Path | None = None,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mode: str = "none",
) -> DecodedImages:
    """Decode `paths` in parallel threads (PIL releases the GIL while decoding), in storage form `mode`."""
    result = DecodedImages()
    start = time.perf_counter()

    def load(path: Path) -> tuple[Path, np.ndarray | None, str]:
        try:
            image, digest = load_image_file(path, min_side, cache_dir, max_pixels, mode)
            return path, image, digest
        except DecodeError as e:
            return path, None, str(e)

    with ThreadPoolExecutor(max_workers=workers or available_cpus()) as pool:
        for path, image, info in pool.map(load, paths):
            if image is None:
                result.failures[path] = info
            else:
                result.images[path], result.digests[path] = image, info
    log.info(
        "Decoded %d images in %.1f s (%d unreadable).",
        len(result.images),
        time.perf_counter() - start,
        len(result.failures),
    )
    return result

"""`data.decode=gpu`: images are kept as JPEG bytes, and every batch is decoded (nvJPEG, through
torchvision.io.decode_jpeg), cropped, resized, flipped, colour-adjusted, down-scaled, re-compressed
and normalised on the trainer's device, so that CPU loader workers no longer limit a GPU. The
workers only hand over each image's bytes with its random parameters (`DevicePlan.sample`), drawn
from a generator seeded by (seed, epoch, image) as on the CPU path, so a run is repeatable.

The parameters come from the configured albumentations list (one place says what augmentation a
recipe uses); a transform this path cannot run on the device is named in a one-line error
(`data.decode=gpu`) or sends `auto` to the CPU path. Crop + resize is one `roi_align` over the
batch (bilinear at the centre of each output pixel: what albumentations' resize computes), so the
images the model sees match the CPU path's to a small tolerance (tests/test_device_decode.py)."""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

DECODE_MODES = ("auto", "cpu", "gpu")
# `auto` decodes on the device from this many training images: below it the whole set is a few
# seconds of CPU work an epoch, and re-encoding it as JPEG costs more than it saves
AUTO_MIN_IMAGES = 2_000
# the stored form of each decoded image on the device path (a re-encode; about 1/255 mean error)
STORED_QUALITY = 95
# a parameter row: crop box (x0, y0, x1, y1) in pixels, horizontal / vertical flip, contrast,
# brightness, down-and-up scale (0: none) and JPEG quality (0: none)
PARAMS = ("x0", "y0", "x1", "y1", "hflip", "vflip", "alpha", "beta", "scale", "quality")


class UnsupportedOnDevice(ValueError):
    """A configured augmentation that the device path cannot run."""


@dataclass(frozen=True)
class EncodedImage:
    """A decoded image as the device path stores it: JPEG bytes and the image's size."""

    data: np.ndarray  # uint8, one dimension
    height: int
    width: int


def encode_image(image: np.ndarray) -> EncodedImage:
    """An RGB uint8 array (H, W, 3) as JPEG bytes of quality STORED_QUALITY."""
    from torchvision.io import encode_jpeg

    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    data = encode_jpeg(chw, quality=STORED_QUALITY).numpy()
    return EncodedImage(data, int(image.shape[0]), int(image.shape[1]))


def encode_all(images: dict[Any, np.ndarray], workers: int | None = None) -> dict[Any, EncodedImage]:
    """encode_image of every value, in threads (libjpeg-turbo releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    from railway_defect.utils.resources import available_cpus

    with ThreadPoolExecutor(max_workers=workers or available_cpus()) as pool:
        return dict(zip(images, pool.map(encode_image, images.values()), strict=True))


def check_decode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise ValueError(f"data.decode={mode!r} is not one of {', '.join(DECODE_MODES)}")
    return mode


# the device's order of steps; a configured list must follow it (crop first, compression last)
DEVICE_STEPS = (
    "RandomResizedCrop",
    "HorizontalFlip",
    "VerticalFlip",
    "RandomBrightnessContrast",
    "Downscale",
    "ImageCompression",
)
Range = tuple[float, float]


@dataclass(frozen=True)
class DevicePlan:
    """What the device does to each image, in DEVICE_STEPS order: a random resized crop (its scale
    and ratio ranges) to `size`, flips, a brightness/contrast change, a down-and-up scaling and a
    JPEG re-compression, each with its probability (the nuisance augmentation included)."""

    size: int
    crop: tuple[Range, Range] | None = None  # (scale, ratio)
    hflip: float = 0.0
    vflip: float = 0.0
    colour: tuple[float, Range, Range] | None = None  # p, brightness, contrast
    downscale: tuple[float, Range] | None = None  # p, scale
    compression: tuple[float, Range] | None = None  # p, quality

    @classmethod
    def from_transforms(cls, transforms: Sequence[Any], size: int) -> DevicePlan:
        """The plan of an albumentations list; UnsupportedOnDevice names a transform it cannot run."""
        fields: dict[str, Any] = {}
        step = -1
        for position, t in enumerate(transforms):
            name, form = type(t).__name__, _device_form(t)
            if form is None or DEVICE_STEPS.index(name) <= step:
                raise UnsupportedOnDevice(
                    f"albumentations.{name} (position {position}) has no device form; the device path "
                    f"runs {', '.join(DEVICE_STEPS)} in that order (RandomResizedCrop with p=1, "
                    "brightness by max, nearest-neighbour Downscale, JPEG compression)"
                )
            step = DEVICE_STEPS.index(name)
            fields.update(form)
        return cls(size, **fields)

    def sample(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """One image's parameter row (PARAMS): the whole image, unflipped and unchanged when the
        plan has no random step (evaluation)."""
        box = self._crop_box(rng, height, width) if self.crop else (0.0, 0.0, float(width), float(height))
        hflip = float(self.hflip > 0 and rng.random() < self.hflip)
        vflip = float(self.vflip > 0 and rng.random() < self.vflip)
        alpha, beta = 1.0, 0.0
        if self.colour is not None and rng.random() < self.colour[0]:
            _, brightness, contrast = self.colour
            alpha, beta = 1.0 + rng.uniform(*contrast), rng.uniform(*brightness) * 255.0
        scale = quality = 0.0
        if self.downscale is not None and rng.random() < self.downscale[0]:
            scale = rng.uniform(*self.downscale[1])
        if self.compression is not None and rng.random() < self.compression[0]:
            quality = float(rng.integers(int(self.compression[1][0]), int(self.compression[1][1]) + 1))
        return np.array([*box, hflip, vflip, alpha, beta, scale, quality], dtype=np.float32)

    def _crop_box(self, rng: np.random.Generator, height: int, width: int) -> tuple[float, ...]:
        """The Inception-style crop (as albumentations and torchvision draw it): an area share and a
        log-uniform aspect ratio, ten tries, then the centre crop at the nearest allowed ratio."""
        assert self.crop is not None
        (scale_low, scale_high), (ratio_low, ratio_high) = self.crop
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(scale_low, scale_high)
            ratio = math.exp(rng.uniform(math.log(ratio_low), math.log(ratio_high)))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                return float(x), float(y), float(x + w), float(y + h)
        ratio = width / height
        w, h = (width, height)
        if ratio < ratio_low:
            h = round(width / ratio_low)
        elif ratio > ratio_high:
            w = round(height * ratio_high)
        x, y = (width - w) // 2, (height - h) // 2
        return float(x), float(y), float(x + w), float(y + h)


def _device_form(t: Any) -> dict[str, Any] | None:
    """The DevicePlan fields of one albumentations transform, or None when the device cannot run it."""
    import albumentations as A

    if isinstance(t, A.RandomResizedCrop) and t.p == 1:
        return {"crop": (tuple(t.scale), tuple(t.ratio))}
    if isinstance(t, A.HorizontalFlip | A.VerticalFlip):
        return {"hflip" if isinstance(t, A.HorizontalFlip) else "vflip": float(t.p)}
    if isinstance(t, A.RandomBrightnessContrast) and t.brightness_by_max and not t.ensure_safe_range:
        return {"colour": (float(t.p), tuple(t.brightness_limit), tuple(t.contrast_limit))}
    nearest = {"downscale": 0, "upscale": 0}  # cv2.INTER_NEAREST both ways, albumentations' default
    if isinstance(t, A.Downscale) and dict(t.interpolation_pair) == nearest:
        return {"downscale": (float(t.p), tuple(t.scale_range))}
    if isinstance(t, A.ImageCompression) and t.compression_type == "jpeg":
        return {"compression": (float(t.p), tuple(t.quality_range))}
    return None


class DeviceItems:
    """What a loader worker does on the device path, in place of the CPU transform (same calls):
    the image's bytes and its parameter row, from a generator that `set_random_seed` reseeds."""

    def __init__(self, plan: DevicePlan, seed: int | None = None):
        self.plan, self.rng = plan, np.random.default_rng(seed)

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: EncodedImage) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        params = self.plan.sample(self.rng, image.height, image.width)
        return {"image": (torch.from_numpy(image.data), torch.from_numpy(params))}


class EncodedBatch(NamedTuple):
    """A batch before the device: JPEG bytes (on the CPU, as nvJPEG wants them), parameter rows
    (B, len(PARAMS)) and targets."""

    data: list[torch.Tensor]
    params: torch.Tensor
    targets: torch.Tensor


def collate_encoded(items: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], int]]) -> EncodedBatch:
    data = [encoded for (encoded, _), _ in items]
    params = torch.stack([p for (_, p), _ in items])
    return EncodedBatch(data, params, torch.tensor([target for _, target in items]))


def decode_on(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> (3, H, W) uint8 images on `device`: nvJPEG in one batched call on CUDA."""
    from torchvision.io import ImageReadMode, decode_jpeg

    decoded = decode_jpeg(data, mode=ImageReadMode.UNCHANGED, device=device)
    return list(decoded) if isinstance(decoded, list | tuple) else [decoded]


def _canvas(images: list[torch.Tensor]) -> torch.Tensor:
    """The images in one (B, 3, H, W) float tensor of the largest size, each padded by repeating
    its last row and column (a crop resampled at its edge never mixes in another value)."""
    if len({(tuple(i.shape), i.dtype) for i in images}) == 1:  # one size (video, one camera): one copy
        return torch.stack(images).float()
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    canvas = torch.empty((len(images), 3, height, width), dtype=torch.float32, device=images[0].device)
    for k, image in enumerate(images):
        h, w = image.shape[1:]
        canvas[k, :, :h, :w] = image
        canvas[k, :, :h, w:] = image[:, :, -1:]
        canvas[k, :, h:, :] = canvas[k, :, h - 1 : h, :]
    return canvas


def render(
    images: list[torch.Tensor], params: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Decoded uint8 images and their parameter rows -> the normalised (B, 3, size, size) batch:
    crop + resize in one roi_align (bilinear at each output pixel's centre, as cv2's resize), then
    flips, contrast and brightness (clipped to 0..255), down-and-up scaling, JPEG re-compression and
    normalisation."""
    from torchvision.ops import roi_align

    device = images[0].device
    scales, qualities = params[:, 8].tolist(), params[:, 9].tolist()  # from the host: no device sync
    params = params.to(device, torch.float32)
    boxes = torch.cat(
        [torch.arange(len(images), device=device, dtype=torch.float32)[:, None], params[:, :4]], 1
    )
    x = roi_align(_canvas(images), boxes, output_size=size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    x = torch.where(params[:, 4, None, None, None] > 0.5, x.flip(-1), x)
    x = torch.where(params[:, 5, None, None, None] > 0.5, x.flip(-2), x)
    x = (x * params[:, 6, None, None, None] + params[:, 7, None, None, None]).clamp_(0, 255)
    x = _recompressed(_downscaled(x, scales), qualities)
    mean_t = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return (x - mean_t) / std_t


def _downscaled(x: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """Images with a scale s > 0 taken down to round(side * s) and back, nearest neighbour both ways
    (albumentations.Downscale's default)."""
    chosen = [k for k, scale in enumerate(scales) if scale > 0]
    if not chosen:
        return x
    x = x.clone()
    for k in chosen:
        height, width = x.shape[2:]
        small = (max(1, round(height * scales[k])), max(1, round(width * scales[k])))
        down = torch.nn.functional.interpolate(x[k : k + 1], size=small, mode="nearest")
        x[k] = torch.nn.functional.interpolate(down, size=(height, width), mode="nearest")[0]
    return x


def _recompressed(x: torch.Tensor, qualities: list[float]) -> torch.Tensor:
    """Images with a quality q > 0 encoded as JPEG at q and decoded again, on their device (one
    call per quality); pixels are rounded to whole values first, as a uint8 image."""
    from torchvision.io import encode_jpeg

    by_quality: dict[int, list[int]] = {}
    for k, quality in enumerate(qualities):
        if quality > 0:
            by_quality.setdefault(int(quality), []).append(k)
    if not by_quality:
        return x
    x = x.clone()
    for quality, chosen in by_quality.items():
        images = [x[k].round().to(torch.uint8) for k in chosen]
        encoded = encode_jpeg(images, quality=quality)
        data = [e.cpu() for e in encoded]  # nvJPEG decodes from host memory
        for k, image in zip(chosen, decode_on(data, x.device), strict=True):
            x[k] = image.float()
    return x


def accelerator_device_type(accelerator: str) -> str:
    """The device type a trainer.accelerator value trains on (`auto`: CUDA when there is one)."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(accelerator)


@functools.cache
def decoder_error(device_type: str) -> str | None:
    """Why torchvision cannot decode a JPEG on `device_type` (a CUDA build without nvJPEG, no
    device), or None when it can: tried once per process on a tiny image."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return "torchvision cannot decode JPEGs on cuda (no CUDA device here)"
    try:
        tiny = encode_image(np.zeros((8, 8, 3), dtype=np.uint8))
        decode_on([torch.from_numpy(tiny.data)], torch.device(device_type))
    except (RuntimeError, AssertionError, ValueError) as e:
        return (
            f"torchvision cannot decode JPEGs on {device_type} ({str(e).splitlines()[0] if str(e) else e!r})"
        )
    return None


def resolve_decode(mode: str, device_type: str, train_images: int, plan_error: str | None) -> str:
    """`cpu` or `gpu` for data.decode: `auto` is gpu when training on CUDA with at least
    AUTO_MIN_IMAGES training images and augmentations the device can run; an explicit `gpu` with
    augmentations it cannot run, or on a device torchvision cannot decode on, is a one-line error."""
    if check_decode(mode) == "gpu":
        plan_error = plan_error or decoder_error(device_type)
        if plan_error is not None:
            raise UnsupportedOnDevice(f"data.decode=gpu: {plan_error}; use data.decode=cpu")
        if device_type != "cuda":
            log.warning(
                "data.decode=gpu on a %s trainer: the batch path runs there (no speed-up).", device_type
            )
        return "gpu"
    if mode == "cpu":
        return "cpu"
    reasons = [
        *([] if device_type == "cuda" else [f"the trainer runs on {device_type}"]),
        *([] if train_images >= AUTO_MIN_IMAGES else [f"{train_images} < {AUTO_MIN_IMAGES} training images"]),
        *([] if plan_error is None else [plan_error]),
    ]
    if not reasons and (error := decoder_error(device_type)) is not None:
        reasons.append(error)
    choice = "cpu" if reasons else "gpu"
    log.info("data.decode=auto -> %s%s.", choice, f" ({'; '.join(reasons)})" if reasons else "")
    return choice


# ---- scoring (predict, serve) ----------------------------------------------------------------
class UndecodableOnDevice(Exception):
    """Images of a batch that the device could not decode (by position): the CPU decodes them."""

    def __init__(self, positions: list[int]):
        super().__init__(f"{len(positions)} images could not be decoded on the device")
        self.positions = positions


def jpeg_for_device(data: bytes, max_pixels: int) -> EncodedImage | None:
    """A file's bytes to decode on the device, when it is a plain JPEG (RGB, upright, within the
    pixel guard); None: the CPU decodes it (and names what is wrong with it)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            plain = image.format == "JPEG" and image.mode == "RGB" and image.getexif().get(0x0112, 1) == 1
            width, height = image.size
    except Exception:
        return None
    if not plain or width * height > max_pixels:
        return None
    return EncodedImage(np.frombuffer(data, dtype=np.uint8).copy(), height, width)


def _decode_each(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """decode_on for the batch; after a failure, image by image, naming the ones that fail."""
    try:
        return decode_on(data, device)
    except RuntimeError:
        decoded, failed = [], []
        for position, item in enumerate(data):
            try:
                decoded.extend(decode_on([item], device))
            except RuntimeError:
                failed.append(position)
        if failed:
            raise UndecodableOnDevice(failed) from None
        return decoded


def shrink_on(images: list[torch.Tensor], min_side: int) -> list[torch.Tensor]:
    """(3, H, W) images with their shorter side at most `min_side`: bilinear with antialiasing and
    rounded to whole values, as the CPU path's PIL shrink and uint8 store; images of one size are
    resized in one call."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(position)
    shrunk = list(images)
    for (_, height, width), positions in by_shape.items():
        if min(height, width) <= min_side:
            continue
        scale = min_side / min(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        batch = torch.stack([images[p] for p in positions]).float()
        resized = torch.nn.functional.interpolate(
            batch, size=size, mode="bilinear", antialias=True, align_corners=False
        )
        for p, image in zip(positions, resized.round_().clamp_(0, 255), strict=True):
            shrunk[p] = image
    return shrunk


def scoring_batch(
    images: Sequence[np.ndarray | EncodedImage],
    device: torch.device,
    min_side: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """The normalised batch on `device` for images decoded on the CPU (arrays) or still JPEG bytes
    (decoded there in one call, then shrunk to `min_side` as training stored them); raises
    UndecodableOnDevice for bytes the device cannot decode."""
    encoded = [k for k, image in enumerate(images) if isinstance(image, EncodedImage)]
    tensors: list[torch.Tensor] = [
        torch.from_numpy(image).permute(2, 0, 1).to(device) if isinstance(image, np.ndarray) else image
        for image in images
    ]
    data = [torch.from_numpy(images[k].data) for k in encoded]  # type: ignore[union-attr]
    try:
        decoded = _decode_each(data, device)
    except UndecodableOnDevice as e:
        raise UndecodableOnDevice([encoded[p] for p in e.positions]) from None
    for k, image in zip(encoded, shrink_on(decoded, min_side), strict=True):
        tensors[k] = image
    whole = [DevicePlan(size).sample(np.random.default_rng(0), t.shape[1], t.shape[2]) for t in tensors]
    return render(tensors, torch.from_numpy(np.stack(whole)), size, mean, std)


def resolve_scoring_decode(mode: str, device_type: str, harmonize: str) -> bool:
    """Whether predict / serve decode JPEGs on the model's device: `auto` on CUDA for models of
    data.harmonize=none (a thumbnail's re-encode runs on the CPU); `gpu` anywhere (on a CPU the
    same torch ops run there: the stand-in the tests use)."""
    if check_decode(mode) == "cpu":
        return False
    if harmonize != "none":
        if mode == "gpu":
            raise UnsupportedOnDevice(
                f"decode=gpu: this model was trained with data.harmonize={harmonize}, whose re-encode "
                "runs on the CPU; use decode=cpu"
            )
        return False
    if (error := decoder_error(device_type)) is not None:
        if mode == "gpu":
            raise UnsupportedOnDevice(f"decode=gpu: {error}; use decode=cpu")
        return False
    return mode == "gpu" or device_type == "cuda"

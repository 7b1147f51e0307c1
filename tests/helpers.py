"""Shared test code: tiny generated images, videos and data sets in every layout, the real
configs composed with Hydra's compose API, the overrides that shrink a run to seconds on a CPU, and
running a command as the user does."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from PIL import Image

import railway_defect  # noqa: F401  (registers resolvers)
from railway_defect.utils.paths import PROJECT_ROOT, config_dir

CONF_DIR = config_dir()
REAL_DATA = PROJECT_ROOT.parent / "shared" / "datasets" / "railway-track-fault"
CLASSES = ("Defective", "Non defective")
# a proxy nobody listens on: any download attempt fails at once, so tests never use the network
OFFLINE_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
}


VAL_METRICS = (
    "val/loss",
    "val/acc",
    "val/balanced_acc",
    "val/precision",
    "val/recall",
    "val/f1",
    "val/auroc",
)


def write_image(
    path: Path, size: tuple[int, int] = (48, 40), label_index: int = 0, seed: int = 0, mode: str = "RGB"
) -> Path:
    """A small image whose content depends on its class (a dark bar for class 0, none for class 1,
    a bright band for class 2), saved by suffix."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(90, 200, size=(h, w, 3), dtype=np.uint8)
    if label_index == 0:
        pixels[:, w // 3 : w // 3 + max(1, w // 8)] = 10
    elif label_index == 2:
        pixels[h // 3 : h // 3 + max(1, h // 6)] = 245
    image = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_video(path: Path, frames: int = 35, fps: float = 10.0, size: tuple[int, int] = (96, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), (i * 7) % 255, dtype=np.uint8))
    writer.release()
    return path


def write_rgba(path: Path) -> Path:
    pixels = np.zeros((40, 60, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[:, :30, 3] = 255  # left half opaque red, right half fully transparent
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def make_split_dataset(root: Path, per_class: dict[str, int], classes: tuple[str, ...] = CLASSES) -> Path:
    """root/<Split>/<class>/*.png|jpg with `per_class[split]` images of each class."""
    seed = 0
    for split, count in per_class.items():
        for label_index, label in enumerate(classes):
            for i in range(count):
                suffix = ".png" if i % 2 else ".jpg"
                write_image(root / split / label / f"{split}_{i}{suffix}", label_index=label_index, seed=seed)
                seed += 1
    return root


def train_config(output_dir: Path, *overrides: str) -> DictConfig:
    """The real train config composed with `overrides`, writing to `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def save_half_then_fail(real_save: Callable[..., None]) -> Callable[..., None]:
    """A torch.save that writes half of the file, then fails as a full disk does."""

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        if hasattr(f, "write"):
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


class _FullDisk(io.RawIOBase):
    """A file on a disk that fills up after `room` bytes."""

    def __init__(self, target: Any, room: int):
        self.target, self.room = target, room

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.target.write(data)


def save_into_a_full_disk(real_save: Callable[..., None]) -> Callable[..., None]:
    """A torch.save whose file fills the disk halfway: torch's own writer then fails as it does on
    a real full disk (a RuntimeError from its C++ writer, the OSError only as its context)."""

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        real_save(obj, _FullDisk(f, len(buffer.getvalue()) // 2), *args, **kwargs)

    return save


# overrides that make a run take seconds on a CPU: small backbone, small images, no downloads
FAST = (
    "model=resnet18",
    "model.pretrained=false",
    "data.image_size=64",
    "data.cache_size=72",
    "data.batch_size=4",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null",
    "callbacks.review=null",  # review images have their own tests (test_review.py)
)


def run_cli(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT_ROOT,
        env={**os.environ, **OFFLINE_ENV, **(env or {})},
    )

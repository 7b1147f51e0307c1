"""What predict scores: an image, a folder (recursive), a glob, or a video sampled every few seconds.
Inputs are listed as paths up front (cheap) and decoded lazily, a few at a time, so memory stays
flat however many files there are; an unreadable input becomes an item with its error."""

from __future__ import annotations

import glob
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from railway_defect.data.discovery import IMAGE_SUFFIXES
from railway_defect.data.images import DecodeError, prepare
from railway_defect.utils.errors import UserError
from railway_defect.utils.resources import available_cpus

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
_GLOB_CHARS = set("*?[")
T = TypeVar("T")


@dataclass
class InputItem:
    """One row of predictions: an image file or one frame of a video, decoded or with its error."""

    path: str
    image: np.ndarray | None = None
    error: str = ""
    frame: int | None = None
    time_s: float | None = None


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _walk(folder: Path) -> Iterator[Path]:
    """Image and video files below `folder`, sorted, hidden files and folders skipped."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and (path.suffix.lower() in IMAGE_SUFFIXES or is_video(path)):
                yield path


def list_sources(spec: str | Path) -> list[Path]:
    """The files `spec` names: itself (any file is tried), a folder's images and videos, or a glob's."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        sources = list(_walk(path))
    elif _GLOB_CHARS & set(str(spec)):
        sources = []
        for match in sorted(glob.glob(os.path.expanduser(str(spec)), recursive=True)):
            match_path = Path(match)
            if match_path.is_dir():
                sources.extend(_walk(match_path))
            elif match_path.is_file():
                sources.append(match_path)
    else:
        raise UserError(f"input={spec} does not exist (give an image, a folder, a glob or a video).")
    if not sources:
        raise UserError(
            f"input={spec} holds no image or video files ({', '.join(sorted(IMAGE_SUFFIXES))}, ...)."
        )
    return sources


def _read_image(path: Path, decode: Callable[[bytes], np.ndarray]) -> InputItem:
    try:
        return InputItem(str(path), image=decode(path.read_bytes()))
    except OSError as e:
        return InputItem(str(path), error=f"cannot read file ({e.strerror or e})")
    except DecodeError as e:
        return InputItem(str(path), error=str(e))


def _frame_time(capture: Any, index: int, fps: float, previous: float) -> float:
    """Seconds from the start of the video to the frame just grabbed, from the container's
    timestamp: phone videos often have a variable frame rate, where `index / fps` drifts by
    seconds. `index / fps` only where the backend gives no timestamp (none, or not increasing)."""
    import cv2

    ms = capture.get(cv2.CAP_PROP_POS_MSEC)
    if np.isfinite(ms) and ms >= 0 and (index == 0 or ms / 1000 > previous):
        return ms / 1000
    return index / fps


def video_frames(path: Path, every_s: float, min_side: int, mode: str = "none") -> Iterator[InputItem]:
    """Frames at 0, every_s, 2*every_s, ... seconds (by their timestamps), shrunk like decoded
    images; one error item if the video cannot be opened."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0.0
        if not fps or fps <= 0 or not np.isfinite(fps):
            yield InputItem(str(path), error="cannot open video (unknown format or no frame rate)")
            return
        index, next_time, produced, time_s = 0, 0.0, 0, -math.inf
        while capture.grab():
            time_s = _frame_time(capture, index, fps, time_s)
            # a half-frame tolerance (at the average rate), so 1.0 s is not missed at 29.97 fps
            if time_s + 0.5 / fps >= next_time:
                ok, frame = capture.retrieve()
                if ok:
                    rgb = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                    image = prepare(rgb, min_side, mode)
                    yield InputItem(str(path), image=image, frame=index, time_s=round(time_s, 3))
                else:
                    yield InputItem(
                        str(path), error="cannot decode frame", frame=index, time_s=round(time_s, 3)
                    )
                produced += 1
                # past every sample time this frame stands for: after a gap in a variable-rate
                # video, the frames that follow it are not all taken to catch up
                while next_time <= time_s + 0.5 / fps:
                    next_time += every_s
            index += 1
        if produced == 0:
            yield InputItem(str(path), error="cannot read any frame of the video")
    finally:
        capture.release()


def estimated_frames(path: Path, every_s: float) -> int:
    """How many items a video will give (for the progress bar); 1 when unknown."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        fps, count = capture.get(cv2.CAP_PROP_FPS), capture.get(cv2.CAP_PROP_FRAME_COUNT)
    finally:
        capture.release()
    if not fps or fps <= 0 or not count or count <= 0:
        return 1
    return max(1, int(np.ceil(count / fps / every_s)))


def iter_inputs(
    sources: Iterable[Path],
    decode: Callable[[bytes], np.ndarray],
    min_side: int,
    every_s: float = 1.0,
    workers: int | None = None,
    chunk: int = 32,
    on_video: Callable[[Path], None] | None = None,
    mode: str = "none",
) -> Iterator[InputItem]:
    """Items in the order of `sources`; images are decoded in parallel threads, `chunk` at a time,
    one chunk ahead of the one being consumed, so decoding overlaps with scoring. Video frames are
    brought to storage form `mode` (data.harmonize) like decoded images."""
    if every_s <= 0:
        raise UserError(f"every_s={every_s} must be positive.")
    with ThreadPoolExecutor(max_workers=workers or available_cpus()) as pool:

        def submit(group: list[Path]) -> tuple[list[Path], dict[Path, Future[InputItem]]]:
            return group, {p: pool.submit(_read_image, p, decode) for p in group if not is_video(p)}

        groups = batched(sources, chunk)
        ahead = deque(submit(group) for group in islice(groups, 2))
        while ahead:
            group, decoding = ahead.popleft()
            for path in group:
                if is_video(path):
                    if on_video is not None:
                        on_video(path)
                    yield from video_frames(path, every_s, min_side, mode)
                else:
                    yield decoding[path].result()
            if (following := next(groups, None)) is not None:
                ahead.append(submit(following))

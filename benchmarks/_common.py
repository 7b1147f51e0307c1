"""Shared by the benchmark scripts: machine description, repeat statistics, tiny synthetic data."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from railway_defect.utils.paths import default_data_root  # noqa: E402

# the data the commands use: $RAILWAY_DATA_DIR, else the sample set beside the checkout
SAMPLE_DATA = Path(default_data_root())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"machine: cpu={cpu_model()!r} cores={cpus} torch_threads={torch.get_num_threads()} "
        f"torch={torch.__version__} python={platform.python_version()} gpu={gpu} loadavg={load}"
    )


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a benchmark's local server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: Any, timeout: float = 300) -> None:
    """Poll `url` until it answers 200; a server process that exits, or `timeout`, ends the script."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not answer {url} in time")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes and repeats: checks the script runs")
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats of both sides")
    return p


def timed(fn: Callable[[], int]) -> float:
    """Items per second of fn(), which returns how many items it processed."""
    start = time.perf_counter()
    count = fn()
    return count / (time.perf_counter() - start)


def alternate(
    a: Callable[[], float], b: Callable[[], float], repeats: int
) -> tuple[list[float], list[float]]:
    """Run a and b alternately (a, b, b, a, a, b, ...) so drifting machine load hits both sides alike."""
    xs, ys = [], []
    for i in range(repeats):
        if i % 2 == 0:
            xs.append(a())
            ys.append(b())
        else:
            ys.append(b())
            xs.append(a())
    return xs, ys


def stats(values: Sequence[float]) -> str:
    return f"min={min(values):.3f} median={statistics.median(values):.3f} max={max(values):.3f}"


def report(name: str, a_label: str, a: Sequence[float], b_label: str, b: Sequence[float], unit: str) -> None:
    """Prints both sides and their per-repeat ratio a/b; the `ratio` line is what the goals refer to."""
    print(f"{a_label}: {stats(a)} {unit}")
    print(f"{b_label}: {stats(b)} {unit}")
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    print(f"ratio {name} ({a_label} / {b_label}): {stats(ratios)} over {len(ratios)} repeats")


def _write_photo(job: tuple[Path, int, tuple[int, int]]) -> None:
    """One photo-like JPEG: smooth shading, a dark rail, sleepers and mild noise (quality 90)."""
    import numpy as np
    from PIL import Image

    path, seed, (width, height) = job
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.3, 3)
    image = np.stack(
        [110 + 60 * np.sin(x / 41 + phase[0]), 120 + 50 * np.cos(y / 29 + phase[1]), 90 + 0.1 * x], -1
    )
    rail = int(rng.integers(height // 4, height // 2))
    image[rail : rail + height // 10] = 40
    image[:, :: max(8, width // 12)] *= 0.6
    image += rng.normal(0, 4, image.shape)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_photos(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> Path:
    """`count` photo-like JPEGs of `size` (W, H) in `folder`, written on every CPU."""
    from multiprocessing import Pool

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{i:06d}.jpg", i, size) for i in range(count)]
    with Pool() as pool:
        pool.map(_write_photo, jobs, chunksize=64)
    return folder


def make_synthetic_dataset(root: Path, per_class: int, size: tuple[int, int] = (320, 240)) -> Path:
    """root/{Train,Validation}/<class>/*.jpg: random photos, for --quick runs without the sample data."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("Train", per_class), ("Validation", max(1, per_class // 2))):
        for label in ("Defective", "Non defective"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def offline() -> None:
    """Benchmarks never download: any attempt fails at once."""
    os.environ.setdefault("HTTP_PROXY", "http://127.0.0.1:9")
    os.environ.setdefault("HTTPS_PROXY", "http://127.0.0.1:9")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

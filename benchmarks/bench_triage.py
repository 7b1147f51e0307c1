"""The triage page in a real browser (Playwright, the system's chromium), against
`python -m railway_defect.triage` on 127.0.0.1 with a queue of N generated 224x224 thumbnails.

1. Next-photo latency: the reviewer moves on (arrow key) at human speed; the time from the key to
   the next photo drawn, measured in the page, p50/p95, at the start and deep in the queue.
2. Labelling: two reviewers in two browser contexts label 100 photos by keyboard at human speed;
   the server is killed (-9) halfway and restarted; the pages retry what was in flight. Prints
   the rows in the label store against the presses made.

    python benchmarks/bench_triage.py [--photos 10000 --moves 200 --chromium /usr/bin/chromium]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import PROJECT_ROOT, free_port, machine_info, parser, wait_until_up
from PIL import Image

from railway_defect.data.label_store import Item, LabelStore, file_digest

CLASSES = ["Defective", "Non defective"]


def thumbnails(folder: Path, count: int) -> list[Path]:
    """Smooth 224x224 JPEGs with noise (about the size of real thumbnails), each different."""
    rng = np.random.default_rng(0)
    base = np.linspace(60, 200, 224, dtype=np.float32)[None, :, None].repeat(224, 0).repeat(3, 2)
    paths = []
    for i in range(count):
        pixels = np.clip(base + rng.normal(0, 12, base.shape) + (i % 97), 0, 255).astype(np.uint8)
        path = folder / f"frame_{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=85)
        paths.append(path)
    return paths


def queue(db: Path, photos: list[Path]) -> None:
    p = np.random.default_rng(1).random(len(photos))
    items = [
        Item(i, str(path), None, None, file_digest(path), [float(p[i]), 1 - float(p[i])])
        for i, path in enumerate(photos)
    ]
    meta = {"input": str(photos[0].parent), "order": "defect", "model": "generated", "classes": CLASSES}
    LabelStore(db).set_queue({**meta, "positive_class": CLASSES[0]}, items)


class Server:
    """`python -m railway_defect.triage` on the label store `db`, on one port across restarts."""

    def __init__(self, db: Path):
        self.port = free_port()
        self.start(db)

    def start(self, db: Path) -> None:
        args = [f"db={db}", f"port={self.port}", f"hydra.run.dir={db.parent / 'log'}"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "railway_defect.triage", *args],
            cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until_up(f"{self.url}api/meta", self.process, timeout=120)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


def open_page(browser, url: str, reviewer: str, at: int):
    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.goto(f"{url}?reviewer={reviewer}&at={at}")
    page.wait_for_selector("body[data-ready=true]")
    return page


def latency(browser, url: str, at: int, moves: int, pause_s: float) -> np.ndarray:
    """ms from the key to the next photo drawn, for `moves` moves at human speed."""
    page = open_page(browser, url, "latency", at)
    page.evaluate("window.triage.timings.length = 0")
    for step in range(1, moves + 1):
        page.keyboard.press("ArrowRight")
        page.wait_for_function(f"document.body.dataset.shown === '{at + step}'")
        time.sleep(pause_s)
    timings = np.array(page.evaluate("window.triage.timings"))
    page.context.close()
    return timings


def label_with_a_kill(browser, server: Server, db: Path, photos: int, pause_s: float) -> tuple[int, int]:
    """Two reviewers label `photos` photos between them; the server is killed halfway."""
    pages = [open_page(browser, server.url, "ann", 0), open_page(browser, server.url, "bob", photos // 2)]
    presses = 0
    for step in range(photos // 2):
        if step == photos // 4:
            server.kill()
            server.start(db)
        for page in pages:
            position = page.evaluate("window.triage.position")
            page.keyboard.press("1" if position % 3 else "2")
            page.wait_for_function(f"window.triage.position === {position + 1}")
            presses += 1
        time.sleep(pause_s)
    for page in pages:
        page.wait_for_function(f"window.triage.saved >= {photos // 2}", timeout=120_000)
        page.evaluate("window.triage.pending")
    time.sleep(1)
    return presses, len(LabelStore(db).current())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=10_000)
    p.add_argument("--moves", type=int, default=200)
    p.add_argument("--pause-s", type=float, default=0.3, help="a reviewer's time per photo")
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium"))
    args = p.parse_args()
    if args.quick:
        args.photos, args.moves, args.pause_s = 300, 20, 0.05
    if not args.chromium:
        raise SystemExit("no chromium: apt-get install chromium, or --chromium PATH")
    from playwright.sync_api import sync_playwright

    print(machine_info())
    with tempfile.TemporaryDirectory(prefix="bench_triage_") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        photos = thumbnails(folder, args.photos)
        queue(folder / "triage.sqlite", photos)
        seconds = time.perf_counter() - started
        print(f"queue: {len(photos)} thumbnails generated and queued in {seconds:.1f} s")
        server = Server(folder / "triage.sqlite")
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                report(browser, server, folder / "triage.sqlite", args)
                browser.close()
        finally:
            server.kill()


def report(browser, server: Server, db: Path, args) -> None:
    for name, at in (("start", 0), ("deep", int(args.photos * 0.9))):
        ms = latency(browser, server.url, at, args.moves, args.pause_s)
        p50, p95 = np.percentile(ms[1:], [50, 95])  # [0]: the photo the page opened on
        print(
            f"next-photo latency at {name} of the queue (position {at}): p50 {p50:.0f} ms, "
            f"p95 {p95:.0f} ms, {len(ms) - 1} moves"
        )
    labelled = 100 if not args.quick else 20
    presses, rows = label_with_a_kill(browser, server, db, labelled, args.pause_s)
    print(
        f"labelling: {presses} keyboard labels by 2 reviewers with one kill -9 of the server: "
        f"{rows} rows in the label store"
    )
    kept = rows / presses  # one labelling run: min, median and max are that run's
    print(f"ratio labels kept (rows / presses): min={kept:.3f} median={kept:.3f} max={kept:.3f} (1 run)")


if __name__ == "__main__":
    main()

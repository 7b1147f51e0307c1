"""Photograph the triage page for the README: starts `python -m railway_defect.triage` on a label
store and screenshots the page with headless Chromium (Playwright, the system's browser).

    .venv/bin/python scripts/triage_screenshot.py [--db outputs/triage/runs/<time>/triage.sqlite]
        [--out docs/triage.jpg]

Without --db it draws a few track-like pictures (two rails over sleepers and ballast, some with a
dark gap in a rail) and queues them with made-up probabilities, so the screenshot holds no photo
of any data set and no path of this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from railway_defect.data.label_store import Item, LabelStore, file_digest  # noqa: E402


def track(path: Path, seed: int, gap: bool) -> Path:
    """A drawn track: ballast noise, sleepers, two rails; `gap`: a break in the left rail."""
    rng = np.random.default_rng(seed)
    ballast = rng.normal(120, 30, (480, 640, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(ballast)
    draw = ImageDraw.Draw(image)
    for y in range(-40 + seed * 7 % 60, 480, 90):
        draw.rectangle([60, y, 580, y + 38], fill=(150, 145, 135))
    for x in (200, 420):
        draw.rectangle([x, 0, x + 22, 480], fill=(95, 90, 92))
        draw.rectangle([x + 4, 0, x + 10, 480], fill=(190, 190, 195))
    if gap:
        draw.polygon([(198, 230), (224, 236), (224, 250), (198, 246)], fill=(25, 20, 20))
    image.save(path, quality=92)
    return path


def drawn_queue(folder: Path) -> Path:
    classes = ["Defective", "Non defective"]
    p = [0.93, 0.81, 0.64, 0.31, 0.12, 0.05]
    photos = [track(folder / f"km12_{i:03d}.jpg", i, gap=q > 0.5) for i, q in enumerate(p)]
    items = [
        Item(i, str(f), None, None, file_digest(f), [q, 1 - q])
        for i, (f, q) in enumerate(zip(photos, p, strict=True))
    ]
    db = folder / "triage.sqlite"
    meta = {"input": "inspection/km12", "order": "defect", "model": "3f9c2a1b7d4e8f06", "classes": classes}
    LabelStore(db).set_queue({**meta, "positive_class": "Defective"}, items)
    return db


def serve(db: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [f"db={db}", f"port={port}", f"hydra.run.dir={db.parent / 'log'}"]
    process = subprocess.Popen([sys.executable, "-m", "railway_defect.triage", *args], cwd=ROOT)
    return process, f"http://127.0.0.1:{port}/"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "triage.jpg")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="triage_shot_") as tmp:
        db = args.db or drawn_queue(Path(tmp))
        process, url = serve(db)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 720})
                for _ in range(600):
                    try:
                        page.goto(f"{url}?reviewer=screenshot&at=0")
                        break
                    except Exception:  # the server is still starting
                        time.sleep(0.2)
                page.wait_for_selector("body[data-ready=true]")
                page.wait_for_function("document.body.dataset.shown === '0'")
                page.screenshot(path=str(args.out), type="jpeg", quality=80)
                browser.close()
        finally:
            process.kill()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

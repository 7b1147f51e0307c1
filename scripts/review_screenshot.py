"""Photograph TensorBoard's view of a run for the README: serves a copy of the run's event files
with a real TensorBoard and screenshots one tab with headless Chromium.

    .venv/bin/python scripts/review_screenshot.py [RUN_DIR] [--tab images] [--out docs/review_tensorboard.png]

RUN_DIR defaults to the newest run in outputs/train. Needs a Chromium (Debian: `apt-get install
chromium-headless-shell`, or `chromium`); the event files are copied to a temporary folder first,
so the page shows the run's name rather than a path of this machine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from railway_defect.review.runs import newest_output, open_target
from railway_defect.utils.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: its tests/ tooling
from tests.tensorboard_server import serve_tensorboard

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "chrome")
# no network, no background services, no GPU: a screenshot of a local page only
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)
# which plugin proves each tab has data before the screenshot is taken
TAB_PLUGIN = {"images": "images", "scalars": "scalars", "pr_curves": "pr_curves", "hparams": "scalars"}


def find_browser(given: str | None) -> str:
    for name in (given,) if given else BROWSERS:
        path = shutil.which(name) if name else None
        if path:
            return path
    raise UserError(
        f"No Chromium found ({given or ', '.join(BROWSERS)}): install Debian's chromium-headless-shell "
        "(apt-get install chromium-headless-shell) or pass --browser PATH."
    )


def screenshot(run_dir: Path, out: Path, tab: str, browser: str, size: tuple[int, int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # as `tensorboard --logdir <run dir>` shows it, without the folders above the run
        shutil.copytree(run_dir / "tensorboard", Path(tmp) / run_dir.name / "tensorboard")
        with serve_tensorboard(run_dir.name, cwd=tmp) as tb:
            plugin = TAB_PLUGIN[tab]
            tb.wait_for(lambda: tb.get(f"/data/plugin/{plugin}/tags"), bool)
            raw = Path(tmp) / "screenshot.png"
            command = [
                browser,
                *CHROMIUM_FLAGS,
                f"--window-size={size[0]},{size[1]}",
                # let the page fetch and draw its data before the picture is taken
                "--virtual-time-budget=20000",
                f"--screenshot={raw}",
                f"{tb.url}/#{tab}",
            ]
            result = subprocess.run(command, capture_output=True, text=True, timeout=180)
            if result.returncode != 0 or not raw.is_file():
                raise UserError(f"{browser} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
        # a palette of 256 colours keeps the PNG small enough to commit
        image = Image.open(raw).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.tmp")
        image.save(partial, format="PNG", optimize=True)
        partial.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="a run dir (default: the newest in outputs/train)")
    parser.add_argument("--tab", default="images", choices=sorted(TAB_PLUGIN))
    parser.add_argument("--out", default="docs/review_tensorboard.png", type=Path)
    parser.add_argument("--browser", help="a Chromium executable (default: the first found on PATH)")
    parser.add_argument("--size", default="1400x1100", help="window size WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    try:
        target = open_target(args.run_dir or newest_output())
        if target.kind != "run":
            raise UserError(f"{target.path} is a sweep; pass one of its runs (e.g. {target.runs[0]}).")
        width, height = (int(v) for v in args.size.lower().split("x"))
        screenshot(target.path, args.out, args.tab, find_browser(args.browser), (width, height))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

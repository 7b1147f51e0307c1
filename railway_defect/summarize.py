"""`python -m railway_defect.summarize SWEEP_DIR`: rebuild a sweep's summary.csv / summary.md from
its job directories (also for a sweep that was interrupted) and print the table."""

from __future__ import annotations

import argparse

from railway_defect.sweeps.summary import summarize_and_write
from railway_defect.utils.commands import run_command


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m railway_defect.summarize", description=__doc__)
    parser.add_argument("sweep_dir", help="a sweep directory, e.g. outputs/train/multiruns/<time>")
    parser.add_argument(
        "--metric", default=None, help="sort by this metric (default: the sweep's optimized_metric)"
    )
    args = parser.parse_args(argv)
    run_command(lambda: summarize_and_write(args.sweep_dir, args.metric))


if __name__ == "__main__":
    main()

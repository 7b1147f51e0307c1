"""`python -m railway_defect.summarize SWEEP_DIR`: rebuild a sweep's summary.csv / summary.md from
its job directories (also for a sweep that was interrupted) and print the table."""

from __future__ import annotations

import argparse
import sys

from railway_defect.sweeps.summary import summarize_and_write
from railway_defect.utils.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m railway_defect.summarize", description=__doc__)
    parser.add_argument("sweep_dir", help="a sweep directory, e.g. outputs/train/multiruns/<time>")
    parser.add_argument(
        "--metric", default=None, help="sort by this metric (default: the sweep's optimized_metric)"
    )
    args = parser.parse_args(argv)
    try:
        summarize_and_write(args.sweep_dir, args.metric)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

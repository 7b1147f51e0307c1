"""Wall time of `python -m railway_defect.train --help` (goal: < 3 s) next to `python -c "import torch"`
(the floor any torch program pays), and of a whole run stopped after its first training step.

    python benchmarks/bench_startup.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    PROJECT_ROOT,
    alternate,
    machine_info,
    make_synthetic_dataset,
    offline,
    parser,
    report,
    stats,
)


def wall(*args: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, env=os.environ
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    offline()
    env_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env_path if env_path else "")
    print(machine_info())
    helps, torches = alternate(
        lambda: wall("-m", "railway_defect.train", "--help"), lambda: wall("-c", "import torch"), repeats
    )
    report("startup", "train --help", helps, "import torch", torches, "s")
    print(f"goal: train --help < 3 s (median {sorted(helps)[len(helps) // 2]:.2f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(Path(tmp) / "data", 4, (96, 72))
        first_step = [
            wall(
                "-m",
                "railway_defect.train",
                "model=resnet18",
                "model.pretrained=false",
                f"data.root={data}",
                "data.image_size=64",
                "data.cache_size=72",
                "data.batch_size=4",
                "trainer.accelerator=cpu",
                "++trainer.max_steps=1",
                "++trainer.limit_val_batches=0",
                "++trainer.num_sanity_val_steps=0",
                "test=false",
                "callbacks.review=null",
                f"hydra.run.dir={tmp}/run{i}",
            )
            for i in range(1 if args.quick else 3)
        ]
    print(f"first training step (whole run, resnet18 64 px, batch 4): {stats(first_step)} s")


if __name__ == "__main__":
    main()

"""The table of benchmarks/gpu_check.sh: one row per check, read from the logs it left in a folder.

python benchmarks/gpu_check_table.py outputs/gpu_check
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from railway_defect.training.record import RunRecord
from railway_defect.utils.layout import has_record

# (log, label, the line's prefix): the median of each matching `ratio ...` or `<side>: ...` line
LINES = (
    ("overhead", "framework / plain loop (training, data.decode=gpu)", "ratio overhead"),
    ("overhead", "framework training img/s (data.decode=gpu)", "framework:"),
    ("overhead", "plain loop training img/s (data.decode=gpu)", "hand-written:"),
    ("overhead_cpu", "framework training img/s (data.decode=cpu: loader workers augment)", "framework:"),
    ("backbones", "raw ResNet train, inference img/s (16-mixed channels_last)", "16-mixed channels_last:"),
    ("backbones", "raw ResNet train, inference img/s (fp32 channels_last)", "channels_last:"),
    ("predict", "predict files -> CSV img/s", "files -> CSV:"),
    ("predict", "predict / raw forward", "ratio predict"),
    ("predict_many", "predict 640x480 JPEGs files -> CSV img/s, decode=gpu", "files -> CSV decode=gpu:"),
    ("predict_many", "predict 640x480 JPEGs files -> CSV img/s, decode=cpu", "files -> CSV decode=cpu:"),
)


def medians(log: Path, prefix: str) -> list[str]:
    if not log.is_file():
        return []
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = re.search(r"median=([0-9.]+)", line)
        if line.startswith(prefix) and match:
            found.append(match.group(1))
    return found


def main() -> None:
    out = Path(sys.argv[1])
    rows = [("machine", machine_line(out / "overhead.log"))]
    rows.append(("training run (default callbacks)", run_line(out / "train")))
    rows.append(("training run, data.decode=gpu (default callbacks)", run_line(out / "train_device")))
    rows.append(("experiment=offline_best (frozen Lite2, feature cache)", run_line(out / "offline_best")))
    for log, label, prefix in LINES:
        rows.append((label, ", ".join(medians(out / f"{log}.log", prefix)) or "n/a"))
    rows.append(("framework / raw step", framework_over_raw_step(out)))
    export = (out / "export.log").read_text(errors="replace") if (out / "export.log").is_file() else ""
    parity = re.search(r"max \|Δp\| = ([0-9.e+-]+)", export)
    providers = re.search(r"providers: (.*)", export)
    rows.append(("ONNX export parity max |Δp|", parity.group(1) if parity else "n/a (see export.log)"))
    rows.append(("ONNX Runtime providers", providers.group(1) if providers else "n/a"))
    print("| check | result |\n| --- | --- |")
    for label, value in rows:
        print(f"| {label} | {value} |")


def framework_over_raw_step(out: Path) -> str:
    """Framework training img/s (data.decode=gpu) over the raw training step's, the same run's
    numbers (issue 32's goal: >= 0.80)."""
    framework = medians(out / "overhead.log", "framework:")
    raw = medians(out / "backbones.log", "16-mixed channels_last:") or medians(
        out / "backbones.log", "channels_last:"
    )
    if not framework or not raw:
        return "n/a"
    return f"{float(framework[0]) / float(raw[0]):.2f} ({framework[0]} / {raw[0]} img/s; goal >= 0.80)"


def run_line(run_dir: Path) -> str:
    """How a training run of the check ended, its precision and its duration."""
    if not has_record(run_dir):
        return f"no metrics.json: see {run_dir.name}.log"
    record = RunRecord.read(run_dir)
    took = f", {record.duration_s:.0f} s" if record.duration_s is not None else ""
    return f"{record.status}, precision {record.precision}{took}"


def machine_line(log: Path) -> str:
    """The `machine:` line a benchmark printed first."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return next((line.removeprefix("machine: ") for line in lines if line.startswith("machine:")), "n/a")


if __name__ == "__main__":
    main()

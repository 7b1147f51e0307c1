"""Every benchmark script runs end to end in its --quick mode and prints its numbers, so the scripts
cannot rot. Speed goals are read from the scripts' output (BENCHMARKS.md), not asserted here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import OFFLINE_ENV, PROJECT_ROOT

BENCHMARKS = PROJECT_ROOT / "benchmarks"
# each script's ratio lines (the numbers its goal refers to)
SCRIPTS = {
    "bench_overhead.py": ("ratio overhead (framework / hand-written)",),
    "bench_data.py": ("ratio cache (later epochs / naive PIL decode)",),
    "bench_predict.py": (
        "ratio predict (files -> CSV / raw forward)",
        "ratio onnx fp32 (fp32 onnxruntime / fp32 pytorch)",
        "ratio int8 (int8 onnxruntime / fp32 pytorch)",
    ),
    "bench_scale.py": ("ratio stream (stream later epoch / memory later epoch)",),
    "bench_startup.py": ("ratio startup (train --help / import torch)",),
    "bench_serve.py": ("ratio latency (p99 / p50)",),
    "bench_triage.py": ("ratio labels kept (rows / presses)",),
    "bench_backbones.py": (
        "ratio resnet18 train (channels_last / fp32 contiguous)",
        "ratio resnet18 inference compiled (compiled / eager channels_last)",
    ),
}
EXTRA_ARGS = {"bench_backbones.py": ["--compile"]}
# other lines a script must print (the accuracy side of its goal)
EXPECTED_LINES = {
    "bench_triage.py": (
        "next-photo latency at start of the queue",
        "next-photo latency at deep of the queue",
    ),
    "bench_serve.py": ("answered with the documented code: 60 of 60;", "server rss at start:"),
    "bench_predict.py": (
        "accuracy fp32 pytorch: auroc=",
        "accuracy fp32 onnxruntime: auroc=",
        "accuracy int8 onnxruntime: auroc=",
    ),
}


@pytest.fixture(scope="module")
def quick_runs() -> dict[str, tuple[int, str, str]]:
    """All scripts at once (one torch thread each): together they take about half the time they
    take one after the other, most of which is importing torch and Lightning."""
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    processes = {
        script: subprocess.Popen(
            [sys.executable, str(BENCHMARKS / script), "--quick", *EXTRA_ARGS.get(script, [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=PROJECT_ROOT,
            env=env,
        )
        for script in SCRIPTS
    }
    results = {}
    for script, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[script] = (process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_quick_mode_runs_and_prints_its_ratio(
    script: str, quick_runs: dict[str, tuple[int, str, str]]
) -> None:
    returncode, stdout, stderr = quick_runs[script]
    assert returncode == 0, stderr[-3000:]
    lines = stdout.splitlines()
    assert any(line.startswith("machine: cpu=") and "torch=" in line for line in lines), stdout
    for prefix in SCRIPTS[script]:
        ratio = next((line for line in lines if line.startswith(prefix)), None)
        assert ratio is not None, stdout
        values = {k: float(v) for k, v in (part.split("=") for part in ratio.split(": ", 1)[1].split()[:3])}
        assert set(values) == {"min", "median", "max"}
        assert 0 < values["min"] <= values["median"] <= values["max"]
    for prefix in EXPECTED_LINES.get(script, ()):
        assert any(line.startswith(prefix) for line in lines), stdout


@pytest.mark.slow
def test_gpu_check_script_runs_its_steps_and_prints_one_table(tmp_path) -> None:
    """QUICK=1 runs every step tiny on whatever device there is (the CPU here): the parts of the GPU
    check that do not need a GPU, and the table it prints."""
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "QUICK": "1",
        "PYTHON": sys.executable,
        "GPU_CHECK_DIR": str(tmp_path),
    }
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh")],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "FAILED" not in result.stdout, result.stdout[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| training run (default callbacks) | finished" in table
    assert "| experiment=offline_best (frozen Lite2, feature cache) | finished" in table
    assert "| training run, data.decode=gpu (default callbacks) | finished" in table
    labels = (
        "framework / plain loop (training",
        "framework / raw step",
        "predict / raw forward",
        "predict 640x480 JPEGs files -> CSV img/s, decode=gpu",
        "ONNX export parity",
    )
    for label in labels:
        (row,) = [line for line in table.splitlines() if label in line]
        assert "n/a" not in row, row

"""CPU thread budgeting: jobs that run side by side must share the cores, not each claim all of them
(2 jobs x 2 torch threads on 2 cores run slower than one job after the other)."""

from __future__ import annotations

import logging
import os

import torch

from railway_defect.errors import UserError

log = logging.getLogger(__name__)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_jobs() -> int:
    """How many Hydra jobs run at once on this machine: `hydra.launcher.n_jobs` under the joblib
    launcher (negative counts back from the number of CPUs, as in joblib), else 1."""
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except (ImportError, ValueError):  # not started by @hydra.main
        return 1
    if "JoblibLauncher" not in str(launcher.get("_target_", "")):
        return 1
    n_jobs = int(launcher.get("n_jobs") or 1)
    return n_jobs if n_jobs > 0 else max(1, available_cpus() + 1 + n_jobs)


def configure_torch_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads: `num_threads` when given, else the CPUs divided among the jobs
    that run in parallel (only when there are several); returns the number in use."""
    if num_threads is None and parallel_jobs() > 1:
        num_threads = max(1, available_cpus() // parallel_jobs())
    if num_threads is not None:
        if num_threads < 1:
            raise UserError(f"num_threads must be at least 1 (or null for automatic), got {num_threads}.")
        torch.set_num_threads(num_threads)
        jobs = parallel_jobs()
        log.info("Using %d torch threads (%d CPUs, %d parallel jobs).", num_threads, available_cpus(), jobs)
    return torch.get_num_threads()

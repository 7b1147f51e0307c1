"""Hardware defaults, decided in one place (measurements in BENCHMARKS.md):

- torch threads: the physical cores this process may use (a second hyper-thread per core adds
  nothing to convolutions), divided among Hydra jobs that run side by side (2 jobs x 2 threads on
  2 cores run slower than one job after the other); `num_threads=N` or OMP_NUM_THREADS override;
- `trainer.precision: auto`: 16-mixed on CUDA (tensor cores), else 32-true (bf16 autocast is ~12x
  slower on a CPU without native bf16);

DataLoader workers and pinned memory are decided by the DataModule (`default_num_workers`); whether
decoded images are kept in memory by `available_memory` (`data.storage: auto`)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from railway_defect.utils.errors import UserError

log = logging.getLogger(__name__)

SYS_CPU = Path("/sys/devices/system/cpu")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
PROC_MEMINFO = Path("/proc/meminfo")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a huge number (2**63 rounded down to pages)
_CGROUP_V1_UNLIMITED = 2**60


def _usable_cpu_ids() -> set[int]:
    """Logical CPUs this process may run on (its affinity mask, e.g. under taskset or SLURM)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def available_cpus() -> int:
    return len(_usable_cpu_ids())


def _cgroup_cpu_limit() -> int | None:
    """The container's CPU quota (cgroup v2 `cpu.max`, e.g. docker --cpus=4), rounded up."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text) if text.isdigit() else None


def _cgroup_memory_headroom() -> int | None:
    """Bytes the process's memory cgroup still allows (limit - usage), v2 or v1; None if unlimited.
    A container's limit is often far below the host's free memory, which /proc/meminfo reports."""
    try:
        lines = PROC_SELF_CGROUP.read_text().splitlines()
    except OSError:
        return None
    headroom = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy: the limit may sit on any ancestor
            folder = CGROUP_ROOT / path.lstrip("/")
            candidates = [(folder, "memory.max", "memory.current")]
            candidates += [(parent, "memory.max", "memory.current") for parent in folder.parents]
        elif "memory" in controllers.split(","):
            base = CGROUP_ROOT / "memory"
            candidates = [
                (base / path.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"),
                (base, "memory.limit_in_bytes", "memory.usage_in_bytes"),
            ]
        else:
            continue
        for folder, limit_name, usage_name in candidates:
            if not folder.is_relative_to(CGROUP_ROOT):
                continue
            limit = _read_int(folder / limit_name)
            if limit is not None and limit < _CGROUP_V1_UNLIMITED:
                headroom.append(max(0, limit - (_read_int(folder / usage_name) or 0)))
    return min(headroom) if headroom else None


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping or being killed: the smaller of the
    machine's MemAvailable and the memory cgroup's headroom; None when neither can be read."""
    found = []
    try:
        for line in PROC_MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _cgroup_memory_headroom()
    if cgroup is not None:
        found.append(cgroup)
    return min(found) if found else None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use, capped by a container's CPU quota."""
    cpus = _usable_cpu_ids()
    try:
        cores = {
            tuple(
                (SYS_CPU / f"cpu{cpu}/topology" / name).read_text().strip()
                for name in ("physical_package_id", "core_id")
            )
            for cpu in cpus
        }
    except OSError:  # no sysfs topology (macOS, some containers): count logical CPUs
        cores = cpus
    limit = _cgroup_cpu_limit()
    return max(1, min(len(cores), limit) if limit else len(cores))


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
    """Set torch's intra-op threads to `num_threads`, or when None to the physical cores divided
    among the parallel jobs (a user's OMP_NUM_THREADS wins outside a parallel sweep: torch has
    already applied it); returns the number in use."""
    if num_threads is not None and num_threads < 1:
        raise UserError(f"num_threads must be at least 1 (or null for automatic), got {num_threads}.")
    cores, jobs = physical_cores(), parallel_jobs()
    if num_threads is not None:
        threads = num_threads
    elif jobs == 1 and os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()
    else:
        threads = max(1, cores // jobs)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    log.info("Using %d torch threads (%d physical cores, %d parallel jobs).", threads, cores, jobs)
    return torch.get_num_threads()


def uses_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """`auto` -> 16-mixed on CUDA, 32-true elsewhere; any other value is Lightning's to check."""
    if str(precision) != "auto":
        return precision
    return "16-mixed" if uses_cuda(accelerator) else "32-true"


# glibc's mallopt parameter for the number of malloc arenas (malloc.h: M_ARENA_MAX)
M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Fewer glibc malloc arenas for a long-running multi-threaded server: by default each request
    thread may get an arena of its own (up to 8 per core) that keeps what it once held, which made
    the service's memory grow by ~560 MB in its first 100 requests, ~280 MB with 2 (BENCHMARKS.md).
    Returns whether it applied (glibc only; elsewhere a no-op)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False

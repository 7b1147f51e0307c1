"""Hardware defaults resolve as BENCHMARKS.md documents: torch threads = physical cores (shared
among parallel jobs), precision 16-mixed on CUDA and 32-true elsewhere, cuDNN autotuning unless
deterministic, DataLoader workers 0 on small CPUs, pinned memory only for a CUDA device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from railway_defect.data import datamodule
from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.training.run import resolve_hardware_defaults
from railway_defect.utils import resources
from railway_defect.utils.errors import UserError


def fake_topology(root: Path, cores_of_cpu: dict[int, tuple[int, int]]) -> Path:
    """A /sys/devices/system/cpu tree: cpu N -> (package id, core id)."""
    for cpu, (package, core) in cores_of_cpu.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True, exist_ok=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Pretend to be a machine with the given CPUs (cpu -> (package, core)) and cgroup cpu.max."""

    def make(cores_of_cpu: dict[int, tuple[int, int]], cpu_max: str | None = None) -> None:
        monkeypatch.setattr(resources, "SYS_CPU", fake_topology(tmp_path / "cpu", cores_of_cpu))
        monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(cores_of_cpu))
        cgroup = tmp_path / "cpu.max"
        if cpu_max is not None:
            cgroup.write_text(cpu_max + "\n")
        monkeypatch.setattr(resources, "CGROUP_CPU_MAX", cgroup)

    return make


def test_hyper_threads_count_once(machine) -> None:
    # 2 packages x 2 cores x 2 hyper-threads
    machine({cpu: (cpu // 4, cpu % 2) for cpu in range(8)})
    assert resources.available_cpus() == 8
    assert resources.physical_cores() == 4


def test_a_container_cpu_quota_caps_the_cores(machine) -> None:
    machine({cpu: (0, cpu) for cpu in range(8)}, cpu_max="250000 100000")
    assert resources.physical_cores() == 3  # 2.5 CPUs of quota: rounded up
    machine({cpu: (0, cpu) for cpu in range(8)}, cpu_max="max 100000")
    assert resources.physical_cores() == 8


def test_without_sysfs_topology_logical_cpus_count(machine, tmp_path: Path, monkeypatch) -> None:
    machine({0: (0, 0), 1: (0, 0)})
    monkeypatch.setattr(resources, "SYS_CPU", tmp_path / "missing")
    assert resources.physical_cores() == 2


def test_torch_threads_default_to_the_physical_cores(machine, monkeypatch) -> None:
    machine({cpu: (0, cpu // 2) for cpu in range(4)})  # 2 cores with 2 threads each
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert resources.configure_torch_threads(None) == 2
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting is kept
        assert resources.configure_torch_threads(None) == 1
        monkeypatch.setattr(resources, "parallel_jobs", lambda: 2)  # hydra/launcher=joblib n_jobs=2
        assert resources.configure_torch_threads(None) == 1
        assert resources.configure_torch_threads(3) == 3  # num_threads=3 wins
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="num_threads must be at least 1"):
        resources.configure_torch_threads(0)


@pytest.mark.parametrize(
    ("precision", "accelerator", "cuda", "expected"),
    [
        ("auto", "auto", False, "32-true"),
        ("auto", "cpu", True, "32-true"),
        ("auto", "auto", True, "16-mixed"),
        ("auto", "gpu", False, "16-mixed"),
        ("bf16-mixed", "auto", True, "bf16-mixed"),  # an explicit value is kept
        ("64-true", "cpu", False, "64-true"),
    ],
)
def test_precision_auto_is_16_mixed_on_cuda_only(monkeypatch, precision, accelerator, cuda, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resources.resolve_precision(precision, accelerator) == expected


def test_the_default_trainer_config_resolves_for_this_machine(compose_train) -> None:
    cfg = compose_train()
    assert (cfg.trainer.precision, cfg.trainer.benchmark) == ("auto", False)
    resolve_hardware_defaults(cfg)
    expected = "16-mixed" if torch.cuda.is_available() else "32-true"
    assert (cfg.trainer.precision, cfg.trainer.benchmark) == (expected, False)
    assert cfg.model.channels_last is True
    assert cfg.model.compile is False

    cfg = compose_train("trainer=gpu")
    resolve_hardware_defaults(cfg)
    assert cfg.trainer.precision == "16-mixed"


@pytest.mark.parametrize(("cpus", "workers"), [(1, 0), (2, 0), (4, 2), (16, 8), (64, 8)])
def test_dataloader_workers_default_to_zero_on_small_cpus(monkeypatch, cpus: int, workers: int) -> None:
    monkeypatch.setattr(datamodule, "available_cpus", lambda: cpus)
    assert datamodule.default_num_workers() == workers


def test_memory_is_pinned_only_for_a_cuda_device(tmp_path: Path) -> None:
    dm = RailwayDataModule.from_settings(root=tmp_path)
    assert dm._pin_memory() is torch.cuda.is_available()

    class Strategy:
        root_device = torch.device("cpu")

    class Trainer:
        strategy = Strategy()

    dm.trainer = Trainer()
    assert dm._pin_memory() is False
    Strategy.root_device = torch.device("cuda", 0)
    assert dm._pin_memory() is True


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_the_service_limits_malloc_arenas_where_glibc_allows() -> None:
    """What keeps the service's memory from growing per request thread (BENCHMARKS.md section 10)."""
    assert resources.limit_malloc_arenas(2) is True

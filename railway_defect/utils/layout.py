"""The on-disk layout of runs and sweeps, low in the stack so that every command can tell a run
directory from a sweep directory without importing training or the sweep summary:

    <run>/metrics.json, <run>/checkpoints/{best,last}.ckpt, <run>/.hydra/
    <sweep>/<job>/... (one run directory per job), <sweep>/summary.md
"""

from __future__ import annotations

from pathlib import Path

RECORD_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"


def in_multirun() -> bool:
    """True inside a job of a Hydra sweep (`-m`, hparams_search=..., experiment=cv)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def has_record(run_dir: str | Path) -> bool:
    """A run directory: training wrote its metrics.json there."""
    return (Path(run_dir) / RECORD_FILE).is_file()


def run_dir_of(ckpt_path: Path) -> Path:
    """outputs/train/runs/<time>/checkpoints/best.ckpt -> outputs/train/runs/<time>."""
    return ckpt_path.parent.parent if ckpt_path.parent.name == CHECKPOINTS_DIR else ckpt_path.parent


def _job_sort_key(path: Path) -> tuple[int, int | str]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job directories, in job order: sub-folders with Hydra's .hydra/ or a metrics.json."""
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or has_record(p))),
        key=_job_sort_key,
    )

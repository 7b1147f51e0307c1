"""Where the project, its data and its outputs live (OmegaConf resolvers used by conf/paths)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "RAILWAY_DATA_DIR"


def data_root_candidates() -> list[Path]:
    """Places searched for the data, in order: the env variable, the project, the shared sample set."""
    candidates = []
    if os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
    candidates.append(PROJECT_ROOT / "data" / "railway-track-fault")
    candidates.append(PROJECT_ROOT.parent / "shared" / "datasets" / "railway-track-fault")
    return candidates


def default_data_root() -> str:
    """The first candidate that exists (the env variable wins even if missing, so errors name it)."""
    candidates = data_root_candidates()
    if os.environ.get(DATA_DIR_ENV):
        return str(candidates[0])
    return str(next((c for c in candidates if c.is_dir()), candidates[0]))


def register_resolvers() -> None:
    for name, fn in {
        "project_root": lambda: str(PROJECT_ROOT),
        "default_data_root": default_data_root,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)

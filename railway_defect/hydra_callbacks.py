"""Hydra callbacks: checks that must run before Hydra creates the run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def _unwritable_reason(directory: Path) -> str | None:
    """Why `directory` cannot be created and written, or None; creates nothing."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


class OutputDirCheck(Callback):
    """An unwritable run/sweep directory is a one-line error instead of a traceback from Hydra."""

    def _check(self, directory: str, key: str) -> None:
        reason = _unwritable_reason(Path(directory).expanduser().absolute())
        if reason:
            raise SystemExit(
                f"error: cannot write the output directory {directory}: {reason}; set {key}=DIR."
            )

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

"""The monitored metric lives in one place: the `monitor` of the checkpoint callback that writes
best.ckpt (`callbacks.model_checkpoint.monitor`). Everything else (the model's `_best` metrics,
ReviewImages, metrics.json, the sweepers' `optimized_metric`) reads it from there."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

MONITOR_KEY = "callbacks.model_checkpoint.monitor"


def configured_monitor(cfg: DictConfig) -> str | None:
    """The monitor as configured, for the checks that run before any callback exists."""
    return OmegaConf.select(cfg, MONITOR_KEY, default=None)


def selecting_checkpoint(callbacks: Sequence[Any]) -> ModelCheckpoint | None:
    """The callback that writes best.ckpt: the one that selects by a monitored metric, else the
    first one (monitor=null: no selection, best.ckpt holds the final epoch's weights)."""
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    return next((c for c in checkpoints if c.monitor), checkpoints[0] if checkpoints else None)


def monitored_metric(callbacks: Sequence[Any]) -> str | None:
    """The metric that selects best.ckpt in a run with these callbacks, or None."""
    checkpoint = selecting_checkpoint(callbacks)
    return checkpoint.monitor if checkpoint else None

"""Sweeps: the end-of-sweep summary table and the Hydra callback that writes it."""

from __future__ import annotations


def in_multirun() -> bool:
    """True inside a job of a Hydra sweep (`-m`, hparams_search=..., experiment=cv)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN

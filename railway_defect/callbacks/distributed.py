"""SyncEpochMetrics: compute the epoch's logged metrics on every process at one fixed point.

A torchmetrics object logged with `on_epoch=True` (the module's `train/loss_epoch`, `train/acc`) is
computed lazily, by whoever reads the trainer's metrics first, and computing it is a collective
(all processes gather their states). Under DDP the progress bar reads them in its
`on_train_epoch_end` on rank 0 only; the other ranks compute them later, in the logger connector.
Any collective between those two points (DivergenceGuard's decision, a callback's barrier) is
then matched against a different one on each rank, and both wait forever. Reading the metrics
first thing at the epoch end, on every rank, makes that computation the same first collective
everywhere; later readers get the cached values.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class SyncEpochMetrics(Callback):
    """Must run before every other callback's `on_train_epoch_end` (training.py puts it first)."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1:
            _ = trainer.callback_metrics  # computes (and caches) every epoch-level metric

"""EpochSeed: the model's randomness (dropout) in an epoch derives from (seed, epoch) alone, so a
run resumed from an epoch-end checkpoint continues exactly as the uninterrupted run would have.
The data side (order, augmentation) is seeded the same way by the DataModule's EpochSampler."""

from __future__ import annotations

from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Callback, LightningModule, Trainer


def epoch_seed(seed: int, epoch: int) -> int:
    """Distinct per (seed, epoch); seeds 1 and 2 never share an epoch's stream."""
    return (seed * 100_003 + epoch) % 2**32


class EpochSeed(Callback):
    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seed_everything(epoch_seed(self.seed, trainer.current_epoch), workers=True, verbose=False)

"""EpochSeed: every epoch's randomness (shuffling, dropout, augmentation, balanced sampling) is
derived from (seed, epoch) alone, so a run resumed from an epoch-end checkpoint continues exactly
as the uninterrupted run would have."""

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
        # runs before the epoch's DataLoader iterator (and so its shuffle order) is created
        seed_everything(epoch_seed(self.seed, trainer.current_epoch), workers=True, verbose=False)
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch)

"""EpochSeed: the model's randomness (dropout) in an epoch derives from (seed, epoch) alone, so a
run resumed from an epoch-end checkpoint continues exactly as the uninterrupted run would have.
The data side (order, augmentation) is seeded the same way by the DataModule's EpochSampler."""

from __future__ import annotations

from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Callback, LightningModule, Trainer

from railway_defect.utils.seeding import epoch_seed


class EpochSeed(Callback):
    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        seed_everything(epoch_seed(self.seed, trainer.current_epoch), workers=True, verbose=False)

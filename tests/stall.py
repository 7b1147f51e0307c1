"""A callback for the DDP tests: one process stops taking part, as a deadlocked or crashed peer
would, so that the others wait in a collective that cannot complete."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class StallRank(Callback):
    def __init__(self, flag: str, rank: int = 1, seconds: float = 300) -> None:
        """After its first training batch, process `rank` touches `flag` and sleeps `seconds`."""
        self.flag, self.rank, self.seconds = Path(flag), rank, seconds

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_rank == self.rank:
            self.flag.touch()
            time.sleep(self.seconds)


class KillRank(Callback):
    def __init__(self, flag: str, rank: int = 1, epoch: int = 1, batch: int = 1) -> None:
        """Process `rank` kills itself (SIGKILL, as a lost machine would go) at training batch `batch`
        of epoch `epoch`, once: `flag` marks that it did, so the restarted process lives on."""
        self.flag, self.rank, self.epoch, self.batch = Path(flag), rank, epoch, batch

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, index: int
    ) -> None:
        at = trainer.current_epoch == self.epoch and index == self.batch
        if trainer.global_rank == self.rank and at and not self.flag.exists():
            self.flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)

"""EpochHistory: every epoch's validation metrics (training metrics when nothing validates), so a
run summary can report the epoch that best.ckpt comes from without reloading checkpoints."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class EpochHistory(Callback):
    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics}
        if self.epochs and self.epochs[-1]["epoch"] == row["epoch"]:
            self.epochs[-1] = row
        else:
            self.epochs.append(row)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """An epoch without validation (data.train_on=train_and_val) gets a row of training metrics."""
        if self.epochs and self.epochs[-1]["epoch"] == trainer.current_epoch:
            return  # validation ran at the end of this epoch (before this hook)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        self.epochs.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})

    def best(self, monitor: str) -> dict[str, Any] | None:
        """The epoch ModelCheckpoint(mode="max") keeps: the first with the highest `monitor` (it
        replaces best.ckpt only on a strict improvement; NaN never improves)."""
        scored = [row for row in self.epochs if not math.isnan(row.get(monitor, math.nan))]
        return max(scored, key=lambda row: row[monitor], default=None)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict.get("epochs", []))

"""EpochHistory: every epoch's validation metrics (training metrics when nothing validates), so a
run summary can report the epoch that best.ckpt comes from without reloading checkpoints."""

from __future__ import annotations

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

    def best(self, monitor: str, value: float | None) -> dict[str, Any] | None:
        """The first epoch whose `monitor` equals `value` (ModelCheckpoint keeps the first of ties)."""
        if value is None:
            return None
        return next((row for row in self.epochs if abs(row.get(monitor, float("nan")) - value) < 1e-9), None)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict.get("epochs", []))

"""DivergenceGuard: stop a run as soon as its training loss is NaN or infinite.

Lightning's EarlyStopping(check_finite=True) only looks at validation time, and a stop request
(`trainer.should_stop`) waits for `min_epochs`; a diverged run should end at once, with its own
status in metrics.json, so that a sweep moves on to the next job.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from railway_defect.utils.errors import UserError


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


class DivergenceGuard(Callback):
    def __init__(self, check_every_n_steps: int = 1) -> None:
        """Non-finite losses are collected on the device and read every `check_every_n_steps` steps,
        so on a GPU a larger value saves host syncs at the price of stopping a few steps later."""
        if check_every_n_steps < 1:
            raise UserError(f"check_every_n_steps must be at least 1, got {check_every_n_steps}.")
        self.check_every_n_steps = check_every_n_steps
        self._bad: torch.Tensor | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._bad = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad = bad if self._bad is None else self._bad | bad  # stays on the device
        if (batch_idx + 1) % self.check_every_n_steps == 0:
            self._check(trainer, batch_idx)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer, None)

    def _check(self, trainer: Trainer, batch_idx: int | None) -> None:
        bad = self._bad is not None and bool(self._bad)
        # every process takes the same decision, so no rank waits for a peer that stopped
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            where = f"epoch {trainer.current_epoch}" + ("" if batch_idx is None else f", batch {batch_idx}")
            raise TrainingDiverged(
                f"training loss became NaN or infinite at {where}; lower optimizer.lr or set "
                "trainer.gradient_clip_val."
            )

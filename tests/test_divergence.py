"""A run whose training loss becomes NaN/inf stops at once, mid-epoch, with status `diverged`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from railway_defect.callbacks.divergence import DivergenceGuard, TrainingDiverged
from railway_defect.training.run import run_training
from tests.helpers import FAST


def test_exploding_lr_stops_the_run_at_once_with_status_diverged(compose_train, tiny_dataset: Path) -> None:
    cfg = compose_train(*FAST, f"data.root={tiny_dataset}", "optimizer.lr=1e30")
    with pytest.raises(TrainingDiverged, match=r"became NaN or infinite at epoch 0, batch \d"):
        run_training(cfg)
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged"
    assert "lower optimizer.lr" in metrics["error"]
    # 12 training images in batches of 4: it stopped inside the first epoch, before validating it
    assert metrics["history"] == [] and metrics["epochs_completed"] == 0
    assert metrics["test"] == {} and not (run_dir / "checkpoints" / "best.ckpt").exists()


def _fake_trainer() -> SimpleNamespace:
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    return SimpleNamespace(strategy=strategy, current_epoch=2)


def test_non_finite_losses_are_read_every_n_steps() -> None:
    guard, trainer = DivergenceGuard(check_every_n_steps=3), _fake_trainer()
    guard.on_train_start(trainer, None)
    guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 0)
    guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(float("inf"))}, None, 1)  # not read yet
    with pytest.raises(TrainingDiverged, match="at epoch 2, batch 2"):
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.4)}, None, 2)
    guard.on_train_start(trainer, None)  # a new fit starts clean
    guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 0)
    guard.on_train_epoch_end(trainer, None)

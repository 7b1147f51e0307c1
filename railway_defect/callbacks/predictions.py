"""ValidationPredictions: every validation image's score from the run's final weights, in
`predictions_val.csv`. In a cross-validation sweep each image is scored by the one fold model that
never trained on it, and by weights no validation metric selected: the out-of-fold predictions that
the sweep summary pools into honest estimates (railway_defect/sweeps/oof.py)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from railway_defect.utils.outputs import write_text_atomic

PREDICTIONS_FILE = "predictions_val.csv"
TEST_PREDICTIONS_FILE = "predictions_test.csv"


def probability_column(positive_class: str) -> str:
    return f"p_{positive_class}"


def shown_classes(class_names: tuple[str, ...] | list[str], positive_index: int) -> list[int]:
    """The classes whose p a predictions file gives: the positive one (binary), else every class."""
    return [positive_index] if len(class_names) == 2 else list(range(len(class_names)))


def _in_sample_order(trainer: Trainer, scores: torch.Tensor) -> torch.Tensor:
    """Every rank's scores, in the validation split's order. Lightning's validation sampler (a
    DistributedSampler without shuffling) gives rank r the images r, r + W, r + 2W, ... and pads
    the list so that all ranks score as many (the padding repeats the first images, and falls off
    the end here). A collective: every rank calls it at the same hook."""
    gathered = trainer.strategy.all_gather(scores)  # (world_size, images per rank, classes)
    return gathered.transpose(0, 1).reshape(-1, *scores.shape[1:]).cpu()


class ValidationPredictions(Callback):
    """predictions_val.csv at every validation epoch (the last one stays), and predictions_test.csv
    when best.ckpt is tested (nested CV's outer-fold scores)."""

    def __init__(self, filename: str = PREDICTIONS_FILE, test_filename: str = TEST_PREDICTIONS_FILE) -> None:
        self.filenames = {"val": filename, "test": test_filename}
        self._scores: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._scores = []

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking and isinstance(outputs, torch.Tensor):
            self._scores.append(outputs.detach().float().cpu())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "test")

    # the test loop collects as the validation loop does
    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end

    def _write(self, trainer: Trainer, pl_module: LightningModule, split: str) -> None:
        if not self._scores:
            return
        scores = torch.cat(self._scores)
        if trainer.world_size > 1:
            scores = _in_sample_order(trainer, scores.to(pl_module.device))
        if not trainer.is_global_zero:
            return
        samples = trainer.datamodule.splits[split]
        names = pl_module.contract.class_names
        shown = shown_classes(names, pl_module.positive_index)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "label", *(probability_column(names[i]) for i in shown), "epoch"])
        # limit_val_batches may have scored only the first images
        for sample, probs in zip(samples, scores[:, shown].tolist(), strict=False):
            writer.writerow(
                [str(sample.path), sample.label, *(f"{p:.6f}" for p in probs), trainer.current_epoch]
            )
        write_text_atomic(Path(trainer.default_root_dir) / self.filenames[split], buffer.getvalue())

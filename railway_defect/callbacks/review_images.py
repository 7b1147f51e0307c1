"""ReviewImages: log to TensorBoard what the model sees, so a run can be judged by looking.

- `train/augmented_batch`: the first training batch of a fit, as augmented and labelled.
- `val/predictions`: validation images captioned with true/predicted label and p(positive),
  wrong ones first and framed red.
- `val/confusion_matrix` (counts and row-normalised, K x K), `val/roc_curve` of the positive class,
  and `val/pr_curve` for TensorBoard's PR-curve plugin (three or more classes: `val/pr_curve/<class>`,
  one against the rest for each).
- `val/gradcam`: Grad-CAM of the most confident errors and the most confident defects.

Validation images are logged every `every_n_epochs` epochs and whenever the monitored metric
improves (so the epoch of best.ckpt is always there). Probabilities come from the module's
validation_step; only the few images that may be shown are kept while an epoch runs.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from railway_defect.callbacks.selection import monitored_metric
from railway_defect.models.gradcam import gradcam_heatmaps, overlay
from railway_defect.utils.errors import UserError
from railway_defect.utils.plots import Tile, caption, confusion_figure, denormalize, roc_figure, tile_grid

log = logging.getLogger(__name__)


@dataclass(order=True)
class _Item:
    score: float
    order: int
    image: torch.Tensor = field(compare=False)
    target: int = field(compare=False)
    probs: np.ndarray = field(compare=False)


def _host_copy(image: torch.Tensor) -> torch.Tensor:
    """Only the few images that may be shown leave the device, never whole batches."""
    return image.detach().to("cpu", copy=True)


class _TopK:
    """The k items with the highest score seen so far (ties: the earliest)."""

    def __init__(self, k: int):
        self.k, self.heap = k, []

    def offer(self, item: _Item) -> None:
        """Keep `item` (with a CPU copy of its image, not a view of the whole batch) if it ranks."""
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, replace(item, image=_host_copy(item.image)))
        elif self.k > 0 and item.score > self.heap[0].score:
            heapq.heapreplace(self.heap, replace(item, image=_host_copy(item.image)))

    def best_first(self) -> list[_Item]:
        return sorted(self.heap, key=lambda i: (-i.score, i.order))


class _EpochCollector:
    """Probabilities and targets of every validation image, plus the images that may be shown."""

    def __init__(self, num_classes: int, positive: int, num_images: int, num_gradcam: int):
        self.positive = positive
        self.probs: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.errors = _TopK(max(num_images, num_gradcam))  # most confident wrong predictions
        self.defects = _TopK(num_gradcam)  # most confident correct positive predictions
        # correct ones, first seen per true class: the same images across epochs where possible
        self.correct: dict[int, list[_Item]] = {c: [] for c in range(num_classes)}
        self.num_images = num_images
        self.counter = itertools.count()

    def add(self, images: torch.Tensor, targets: torch.Tensor, probs: torch.Tensor) -> None:
        probs = probs.detach().float().cpu().numpy()
        targets_np = targets.detach().cpu().numpy().astype(int)
        self.probs.append(probs)
        self.targets.append(targets_np)
        for image, target, p in zip(images, targets_np, probs, strict=True):
            pred = int(p.argmax())
            item = _Item(float(p[pred]), next(self.counter), image, int(target), p)
            if pred != target:
                self.errors.offer(item)
                continue
            if target == self.positive:
                self.defects.offer(_Item(float(p[self.positive]), item.order, image, int(target), p))
            if len(self.correct[int(target)]) < self.num_images:
                self.correct[int(target)].append(replace(item, image=_host_copy(image)))

    @property
    def empty(self) -> bool:
        return not self.targets

    def all_probs(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.probs), np.concatenate(self.targets)

    def grid_items(self) -> list[_Item]:
        """Errors (most confident first), then correct ones taken from each class in turn."""
        items = self.errors.best_first()[: self.num_images]
        queues = [list(q) for q in self.correct.values()]
        while len(items) < self.num_images and any(queues):
            for queue in queues:
                if queue and len(items) < self.num_images:
                    items.append(queue.pop(0))
        return items

    def gradcam_items(self, n: int) -> list[tuple[str, _Item]]:
        """Half most confident errors, half most confident defects; each side fills the other's gap."""
        errors, defects = self.errors.best_first(), self.defects.best_first()
        n_errors = min(len(errors), max(n - len(defects), (n + 1) // 2))
        chosen = [("error", i) for i in errors[:n_errors]]
        return chosen + [("defect", i) for i in defects[: n - n_errors]]


class ReviewImages(Callback):
    """Review images in TensorBoard (see the module docstring). `every_n_epochs`: 0 logs only the
    epochs where the monitored metric (the monitor of the checkpoint callback that writes best.ckpt)
    improved; `num_images` / `num_gradcam` / `num_augmented`: grid sizes."""

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 24,
        num_gradcam: int = 8,
        augmented_batch: bool = True,
        num_augmented: int = 16,
        columns: int = 8,
    ):
        if every_n_epochs < 0:
            raise UserError(
                f"callbacks.review.every_n_epochs must be 0 (best epochs only) or more, got {every_n_epochs}."
            )
        if min(num_images, num_gradcam, num_augmented) < 0 or columns < 1:
            raise UserError("callbacks.review: image counts must be >= 0 and columns >= 1.")
        self.every_n_epochs = every_n_epochs
        self.num_images, self.num_gradcam = num_images, num_gradcam
        self.augmented_batch, self.num_augmented = augmented_batch, num_augmented
        self.columns = columns
        self.monitor: str | None = None
        self.best_score: float | None = None
        self._collector: _EpochCollector | None = None
        self._augmented_logged = False
        self._warned_no_tensorboard = False

    # ---- where to write -------------------------------------------------------------------------
    def _writer(self, trainer: Trainer) -> Any | None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        if not self._warned_no_tensorboard and trainer.loggers and not trainer.fast_dev_run:
            log.warning("ReviewImages: no TensorBoard logger in this run, so no review images are logged.")
        self._warned_no_tensorboard = True
        return None

    # ---- the augmented training batch -----------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._augmented_logged = False
        self.monitor = monitored_metric(trainer.callbacks)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._augmented_logged or not self.augmented_batch or self.num_augmented == 0:
            return
        if not trainer.is_global_zero:
            return
        self._augmented_logged = True
        writer = self._writer(trainer)
        if writer is None:
            return
        images, targets = batch[0][: self.num_augmented], batch[1][: self.num_augmented]
        pixels = denormalize(images, pl_module.mean, pl_module.std)
        names = list(pl_module.contract.class_names)
        tiles = [Tile(p, names[int(t)]) for p, t in zip(pixels, targets, strict=True)]
        title = f"augmented training batch (epoch {trainer.current_epoch}), labelled with the true class"
        writer.add_figure("train/augmented_batch", tile_grid(tiles, self.columns, title), trainer.global_step)
        writer.flush()

    # ---- validation -----------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collector = None
        if trainer.sanity_checking or not trainer.is_global_zero or self._writer(trainer) is None:
            return
        contract = pl_module.contract
        self._collector = _EpochCollector(
            len(contract.class_names), contract.positive_index, self.num_images, self.num_gradcam
        )

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._collector is None:
            return
        if not isinstance(outputs, torch.Tensor):
            raise TypeError("ReviewImages needs validation_step to return the class probabilities (B, C).")
        self._collector.add(batch[0], batch[1], outputs)

    def _improved(self, trainer: Trainer) -> bool:
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        if value is None:
            return False
        value = float(value)
        if np.isnan(value) or (self.best_score is not None and value <= self.best_score):
            return False
        self.best_score = value
        return True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        collector, self._collector = self._collector, None
        if collector is None or collector.empty:
            return
        improved = self._improved(trainer)
        epoch = trainer.current_epoch
        periodic = self.every_n_epochs > 0 and (epoch + 1) % self.every_n_epochs == 0
        if not (improved or periodic):
            return
        writer = self._writer(trainer)
        step = trainer.global_step
        note = f"epoch {epoch}" + (f", best {self.monitor} so far" if improved else "")
        # validation runs under inference mode; Grad-CAM needs autograd
        with torch.inference_mode(False):
            self._log_validation(writer, pl_module, collector, step, note)
        writer.flush()

    def _log_validation(
        self, writer: Any, pl_module: LightningModule, collector: _EpochCollector, step: int, note: str
    ) -> None:
        names, positive = list(pl_module.contract.class_names), collector.positive
        probs, targets = collector.all_probs()
        preds = probs.argmax(axis=1)

        def tile(item: _Item, image: np.ndarray, prefix: str = "") -> Tile:
            pred = int(item.probs.argmax())
            text = caption(names, item.target, pred, float(item.probs[positive]), positive)
            return Tile(image, prefix + text, wrong=pred != item.target)

        items = collector.grid_items()
        if items:
            pixels = denormalize(torch.stack([i.image for i in items]), pl_module.mean, pl_module.std)
            title = (
                f"validation ({note}): {int((preds != targets).sum())} of {len(targets)} wrong; red = wrong"
            )
            tiles = [tile(i, p) for i, p in zip(items, pixels, strict=True)]
            writer.add_figure("val/predictions", tile_grid(tiles, self.columns, title), step)

        writer.add_figure(
            "val/confusion_matrix", confusion_figure(targets, preds, names, f"validation, {note}"), step
        )
        is_positive = targets == positive
        writer.add_figure("val/roc_curve", roc_figure(is_positive, probs[:, positive], names[positive]), step)
        for tag, cls in pr_curve_tags(names, positive):
            writer.add_pr_curve(tag, torch.from_numpy(targets == cls), torch.from_numpy(probs[:, cls]), step)

        chosen = collector.gradcam_items(self.num_gradcam)
        if chosen:
            images = torch.stack([i.image for _, i in chosen]).to(pl_module.device)  # stack copies
            explained = [int(i.probs.argmax()) if kind == "error" else positive for kind, i in chosen]
            heatmaps = _gradcam_keeping_grads(pl_module, images, explained)
            pixels = denormalize(images, pl_module.mean, pl_module.std)
            tiles = []
            for (kind, item), image, heat, cls in zip(chosen, pixels, heatmaps, explained, strict=True):
                tiles.append(tile(item, image, f"{kind}\n"))
                tiles.append(Tile(overlay(image, heat), f"Grad-CAM for\n{names[cls]}", wrong=kind == "error"))
            title = f"Grad-CAM ({note}): most confident errors, then most confident {names[positive]}"
            writer.add_figure("val/gradcam", tile_grid(tiles, self.columns, title), step)

    # ---- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")


def _gradcam_keeping_grads(model: LightningModule, images: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Grad-CAM backpropagates into the parameters; put their gradients back as training left them."""
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        return gradcam_heatmaps(model, images, classes)
    finally:
        for param, grad in saved:
            param.grad = grad


def pr_curve_tags(class_names: list[str], positive: int) -> list[tuple[str, int]]:
    """(tag, class index) of each PR curve: the positive class's for two classes, every class's for more."""
    if len(class_names) <= 2:
        return [("val/pr_curve", positive)]
    return [(f"val/pr_curve/{name}", i) for i, name in enumerate(class_names)]

"""Freeze-then-unfreeze (`callbacks=finetune`): Lightning's BackboneFinetuning, with two fixes.
- `train_bn=False` means what it says. Lightning 2.6 freezes the backbone without it (its issue
  #21531), so the batch-norm layers train and their statistics drift while the head learns alone;
  after unfreezing they drift again. A pretrained backbone fine-tuned on ~100 photos should
  normalise with its ImageNet statistics, in training as in evaluation.
- It works with the lr schedulers. Unfreezing adds the backbone to the optimizer as a new param
  group; torch's schedulers keep one entry per group from their start, and their next step fails
  ("zip() argument 2 is shorter than argument 1")."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BackboneFinetuning as LightningBackboneFinetuning
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from railway_defect.models.module import ignore_frozen_modules_warning


class BackboneFinetuning(LightningBackboneFinetuning):
    """Lightning's BackboneFinetuning; with `train_bn=False` the backbone's batch-norm layers stay as
    pretrained for the whole run: eval mode (running statistics normalise training batches too),
    never updated."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self.train_bn:
            ignore_frozen_modules_warning()

    def freeze_before_training(self, pl_module: LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=self.train_bn)
        self._hold_batch_norm(pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        _schedule_added_groups(trainer)

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Lightning's schedule; unfreezing makes every layer trainable, batch norm included."""
        super().finetune_function(pl_module, epoch, optimizer)
        self._hold_batch_norm(pl_module)

    def _hold_batch_norm(self, pl_module: LightningModule) -> None:
        """Runs at every epoch start: Lightning restores each module's mode after validation, and
        Grad-CAM after explaining, but nothing else calls train() on them."""
        if self.train_bn:
            return
        for module in pl_module.backbone.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
                module.requires_grad_(False)


def _schedule_added_groups(trainer: Trainer) -> None:
    """Each scheduler carries the param groups added since it started (its per-group lists grow,
    after a resume too). Schedulers here step at epoch end and the callback sets the backbone
    group's lr at every epoch start, so that lr stays the callback's, as Lightning intends."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        groups = len(scheduler.optimizer.param_groups)
        for name in ("base_lrs", "_last_lr", "lr_lambdas"):
            values = getattr(scheduler, name, None)
            if isinstance(values, list) and values:
                values.extend([values[-1]] * (groups - len(values)))

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


class BackboneFinetuning(LightningBackboneFinetuning):
    """Lightning's BackboneFinetuning; with `train_bn=False` the backbone's batch-norm layers stay as
    pretrained for the whole run: frozen, and so held in eval mode by the module (running statistics
    normalise training batches too)."""

    def freeze_before_training(self, pl_module: LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=self.train_bn)
        pl_module.train(pl_module.training)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        _schedule_added_groups(trainer)

    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Lightning's schedule; unfreezing makes every layer trainable, batch norm included, so at
        every epoch start (after a resume too) batch norm is frozen again and the module's train()
        puts the layers that learn in training mode and holds the frozen ones in eval."""
        super().finetune_function(pl_module, epoch, optimizer)
        if not self.train_bn:
            for module in pl_module.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.requires_grad_(False)
        pl_module.train(pl_module.training)


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

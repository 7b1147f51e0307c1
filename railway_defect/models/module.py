"""DefectClassifier: backbone + (normalised) dropout/linear head, the loss, and torchmetrics per stage.
Everything else (checkpoints, images for review, summaries) lives in callbacks."""

from __future__ import annotations

import hashlib
import inspect
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from railway_defect import __version__
from railway_defect.models.backbones import create_backbone
from railway_defect.models.contract import ModelContract
from railway_defect.models.network import (
    Network,
    classifier_head,
    logits_per_head,
    pooled_features,
    read_checkpoint,
)
from railway_defect.utils.errors import UserError

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]
# metrics computed per class; the positive class's value is logged
PER_CLASS = ("precision", "recall", "f1", "auroc")
# validation metrics that can pick the best checkpoint (higher is better)
MONITORABLE = tuple(f"val/{name}" for name in ("balanced_acc", "f1", "auroc", "acc", "recall", "precision"))
# tracked as `<metric>_best` when no checkpoint selects (conf/callbacks/default.yaml's monitor)
DEFAULT_MONITOR = "val/balanced_acc"
# torchmetrics' notice that a batch holds one class only (its ROC/AUROC is then undefined)
SINGLE_CLASS_WARNING = r"No (positive|negative) samples in targets"
# Lightning's notice that modules are in eval mode when training starts (a frozen backbone is)
FROZEN_MODULES_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


def plain(value: Any) -> Any:
    """`value` with omegaconf containers and tuples turned into plain dicts and lists, so that a
    checkpoint loads with `torch.load(weights_only=True)`."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _batch_mixer(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> Any:
    """timm's Mixup/CutMix for training batches (soft targets), or None when both alphas are 0."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise UserError(
            f"model.mixup_alpha={mixup_alpha} and model.cutmix_alpha={cutmix_alpha} must be >= 0."
        )
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    from timm.data import Mixup

    # label smoothing stays the loss's (model.label_smoothing), not applied twice
    return Mixup(
        mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=0.0, num_classes=num_classes
    )


def _mix(mixer: Any, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed images and soft targets; timm mixes pairs, so an odd last image stays as it is."""
    even = len(images) - len(images) % 2
    soft = nn.functional.one_hot(targets, mixer.num_classes).to(images.dtype)
    if even == 0:
        return images, soft
    mixed, mixed_soft = mixer(images[:even].clone(), targets[:even])
    return torch.cat([mixed, images[even:]]), torch.cat([mixed_soft.to(images.dtype), soft[even:]])


def stage_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "balanced_acc": MulticlassRecall(num_classes, average="macro"),
            "precision": MulticlassPrecision(num_classes, average=None),
            "recall": MulticlassRecall(num_classes, average=None),
            "f1": MulticlassF1Score(num_classes, average=None),
            "auroc": MulticlassAUROC(num_classes, average=None),
        }
    )


def _check_arguments(backbone_lr_scale: float, monitor: str, num_heads: int) -> None:
    if not backbone_lr_scale >= 0:
        raise UserError(
            f"model.backbone_lr_scale={backbone_lr_scale} must be >= 0 (1 = same lr as the head, "
            "0 = frozen backbone)."
        )
    if monitor not in MONITORABLE:
        raise UserError(
            f"callbacks.model_checkpoint.monitor={monitor} is not a metric to maximise; "
            f"use one of {', '.join(MONITORABLE)}."
        )
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise UserError(f"model.num_heads={num_heads} must be a whole number >= 1 (1 = one linear head).")


def ignore_frozen_modules_warning() -> None:
    """Lightning warns about modules in eval mode at the start of training; frozen pretrained layers
    are in eval mode on purpose."""
    warnings.filterwarnings("ignore", message=FROZEN_MODULES_WARNING, module=r"lightning\.pytorch")


def hold_frozen_layers(module: nn.Module) -> None:
    """Put every part of `module` whose parameters are all frozen in eval mode: pretrained layers
    that do not learn (a linear probe's backbone, batch norm kept as pretrained while fine-tuning)
    normalise with their pretrained statistics and drop nothing, in training as in use."""
    parameters = list(module.parameters())
    if parameters and not any(p.requires_grad for p in parameters):
        module.eval()
        ignore_frozen_modules_warning()
        return
    for child in module.children():
        hold_frozen_layers(child)


# an image tensor by its shape and the digest of its values
ContentKey = tuple[tuple[int, ...], str]


def _content_key(image: torch.Tensor) -> ContentKey:
    """One image tensor (on the CPU) by its shape and the digest of its values, whatever its memory
    layout. SHA-1 guards against accidental collisions here, not attacks: hardware-accelerated, it
    is 3x blake2b, and the key is most of what a cached epoch costs."""
    values = np.ascontiguousarray(image.numpy())  # a copy only if the layout is not C order
    return tuple(image.shape), hashlib.sha1(values, usedforsecurity=False).hexdigest()


class FrozenFeatureCache:
    """A frozen backbone's pooled features by image content. Without random augmentation a linear
    probe shows the backbone the same images every epoch: each is computed once, not once per
    epoch (30 epochs: about 30x less backbone compute, same results). Randomly augmented images
    never repeat; they are computed as usual, and the cache stops growing at `max_bytes`."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes, self.bytes = max_bytes, 0
        self.features: dict[ContentKey, torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        keys = [_content_key(image) for image in images.detach().cpu()]  # one copy off a GPU
        first_of_missing: dict[ContentKey, int] = {}
        for index, key in enumerate(keys):
            if key not in self.features:
                first_of_missing.setdefault(key, index)
        fresh: dict[ContentKey, torch.Tensor] = {}
        if first_of_missing:
            computed = compute(images[list(first_of_missing.values())]).detach()
            fresh = dict(zip(first_of_missing, computed, strict=True))
        for key, value in fresh.items():
            size = value.numel() * value.element_size()
            if self.bytes + size <= self.max_bytes:
                self.features[key], self.bytes = value, self.bytes + size
        return torch.stack([fresh[key] if key in fresh else self.features[key] for key in keys])


# the feature cache of the last frozen backbone fitted in this process, by its fingerprint: the
# fits of a sweep run one after another in one process (Hydra's basic launcher), so the folds of a
# cross-validation, and the inner folds and refits of a nested one, compute each photo once
_shared_cache: dict[str, FrozenFeatureCache] = {}


def shared_feature_cache(backbone: nn.Module, *setting: object) -> FrozenFeatureCache:
    """The cache for this backbone's exact weights and feature `setting` (flips, device,
    precision); a new backbone replaces the last one's, so at most one cache is held."""
    digest = hashlib.blake2b(repr(setting).encode(), digest_size=16)
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    key = digest.hexdigest()
    if key not in _shared_cache:
        _shared_cache.clear()
        _shared_cache[key] = FrozenFeatureCache()
    return _shared_cache[key]


class DefectClassifier(LightningModule):
    """An ImageNet backbone from the factory with a dropout + linear head, trained with
    cross-entropy; every constructor argument is saved in the checkpoint (load it with
    `load_classifier`).

    Args:
        backbone: a name from `models.backbones.BACKBONES` (e.g. `efficientnet_lite2`).
        contract: classes (in the order of the logits), positive class, preprocessing and decision
            threshold (models.contract.ModelContract, or its dict as a checkpoint stores it).
        pretrained / require_pretrained / weights_path: where the backbone's weights come from.
        dropout, label_smoothing: regularisation of the head and the loss.
        head_norm: standardise the features before the linear layer (batch norm without affine
            parameters, as linear probes usually do): the head then sees every feature on one
            scale, which ranked thumbnails better out of fold for a frozen backbone (STUDY.md).
        flip_invariant: the head sees the mean of the backbone's pooled features over the photo and
            its horizontal, vertical and double flips, in training and in use (4x the backbone's
            compute): a rail defect is one whichever way the photo is flipped, and with few photos
            the mean of four views is a less noisy feature than one view plus flip augmentation
            (a frozen Lite2 ranked thumbnails better out of fold, STUDY.md).
        backbone_lr_scale: the backbone's learning rate relative to the head's; 0 freezes it (a
            linear probe: weights and batch-norm statistics stay the pretrained ones, only the
            head learns, which over-fits less than fine-tuning when there are few photos).
        num_heads: linear heads over the same features, initialised differently, each trained
            on its own loss; the model's logits are their mean. A seed ensemble of heads at the
            cost of one: on frozen features one head's ranking of the thumbnails moved with its
            initialisation, and the mean of five moved less and ranked better (STUDY.md). Trained
            on their mean logit instead, they would be one linear layer.
        mixup_alpha, cutmix_alpha: timm Mixup/CutMix of training batches (0 = off).
        class_weights: loss weights per class (data.balance=loss), or None.
        channels_last, compile: speed settings that do not change results.
        monitor: the validation metric that selects best.ckpt, tracked as `<monitor>_best`.
        optimizer, scheduler: factories (Hydra partials) called in `configure_optimizers`.
    """

    def __init__(
        self,
        backbone: str,
        contract: ModelContract | dict[str, Any],
        pretrained: bool = True,
        require_pretrained: bool = False,
        weights_path: str | None = None,
        dropout: float = 0.2,
        label_smoothing: float = 0.0,
        head_norm: bool = False,
        flip_invariant: bool = False,
        backbone_lr_scale: float = 1.0,
        num_heads: int = 1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        class_weights: Sequence[float] | None = None,
        channels_last: bool = True,
        compile: bool = False,
        monitor: str = DEFAULT_MONITOR,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ):
        super().__init__()
        self.contract = contract if isinstance(contract, ModelContract) else ModelContract.from_dict(contract)
        class_names = list(self.contract.class_names)
        class_weights = [float(w) for w in class_weights] if class_weights is not None else None
        _check_arguments(backbone_lr_scale, monitor, num_heads)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "contract"], logger=False)
        self.hparams["contract"] = self.contract.to_dict()  # plain values: weights_only loading
        created = create_backbone(backbone, pretrained, weights_path, require_pretrained)
        self.backbone = created.model
        self.head = classifier_head(
            created.spec.num_features, len(class_names), dropout, head_norm, num_heads
        )
        # facts of the construction, stored beside the arguments by on_save_checkpoint
        self.pretrained_loaded, self.weights_source = created.pretrained_loaded, created.weights_source
        self.positive_index = self.contract.positive_index
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.mixup = _batch_mixer(mixup_alpha, cutmix_alpha, len(class_names))
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-3)
        self.scheduler_factory = scheduler
        self.feature_cache: FrozenFeatureCache | None = None
        self._add_metrics(len(class_names), monitor)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            # in place (nn.Module.compile): parameter names stay `backbone.*`, never
            # `backbone._orig_mod.*`, so checkpoints load with compile on or off
            self.backbone.compile()

    def _add_metrics(self, num_classes: int, monitor: str) -> None:
        """Loss means and torchmetrics per stage, and the best-so-far values logged as
        `<metric>_best` (F1 always, and the checkpoint monitor)."""
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = stage_metrics(num_classes)
        self.test_metrics = stage_metrics(num_classes)
        self.best_tracked = sorted({"val/f1", monitor})
        # persistent: saved in checkpoints, so a resumed run keeps its best-so-far values
        self.val_best = nn.ModuleList([MaxMetric() for _ in self.best_tracked])
        for best in self.val_best:
            best.persistent(True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Plain values only (weights_only loading), and what construction found out: where the
        weights came from."""
        hparams = {
            **(checkpoint.get("hyper_parameters") or {}),
            "pretrained_loaded": self.pretrained_loaded,
            "weights_source": self.weights_source,
        }
        checkpoint["hyper_parameters"] = plain(hparams)
        checkpoint["railway_defect_version"] = __version__  # which code wrote it (the wheel's version)

    def setup(self, stage: str) -> None:
        """backbone_lr_scale=0: the backbone is fixed for training (no gradients, eval mode); scoring
        a loaded model never freezes it."""
        if stage == "fit" and self.hparams.backbone_lr_scale == 0:
            self.backbone.requires_grad_(False)
            # Lightning's loops restore each module's own mode after validation; they never call train()
            self.train(self.training)

    def on_fit_start(self) -> None:
        """A frozen backbone's features come from the process's cache for its exact weights (the
        folds of a sweep share it); a learning one never uses a cache."""
        self.feature_cache = None
        if self._backbone_frozen():
            precision = self.trainer.precision if self._trainer is not None else None
            setting = (self.hparams.flip_invariant, str(self.device), precision)
            self.feature_cache = shared_feature_cache(self.backbone, *setting)

    def on_fit_end(self) -> None:
        self.feature_cache = None

    def on_test_start(self) -> None:
        """Testing best.ckpt after a fit (nested CV's outer fold) reads the same cache."""
        self.on_fit_start()

    def on_test_end(self) -> None:
        self.feature_cache = None

    def _backbone_frozen(self) -> bool:
        """Its output a fixed function of the image: no parameter learns, no layer in training mode."""
        return not any(p.requires_grad for p in self.backbone.parameters()) and not any(
            m.training for m in self.backbone.modules()
        )

    def train(self, mode: bool = True) -> DefectClassifier:
        """Frozen backbone layers stay in eval mode (hold_frozen_layers), whoever calls train()."""
        super().train(mode)
        if mode:
            hold_frozen_layers(self.backbone)
        return self

    @property
    def class_names(self) -> list[str]:
        return list(self.contract.class_names)

    @property
    def backbone_name(self) -> str:
        """The factory's name of the backbone (Grad-CAM looks its layer up by it, as for Network)."""
        return str(self.hparams.backbone)

    @property
    def flip_invariant(self) -> bool:
        return bool(self.hparams.get("flip_invariant", False))

    @property
    def mean(self) -> list[float]:
        return list(self.contract.mean)

    @property
    def std(self) -> list[float]:
        return list(self.contract.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The logits: the mean of the heads' (one head: its own)."""
        return self._logits_per_head(images).mean(1)

    def _logits_per_head(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:  # a no-op when the batch already is
            images = images.contiguous(memory_format=torch.channels_last)
        return logits_per_head(self.head(self._features(images)), self.hparams.num_heads)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features; while fitting with a frozen backbone, through the feature cache (a
        backbone unfrozen mid-fit, e.g. by BackboneFinetuning, ends it; Grad-CAM, which needs
        gradients from the images, bypasses it)."""

        def compute(batch: torch.Tensor) -> torch.Tensor:
            return pooled_features(self.backbone, batch, self.hparams.flip_invariant)

        if self.feature_cache is None or images.requires_grad:
            return compute(images)
        if not self._backbone_frozen():
            self.feature_cache = None
            return compute(images)
        return self.feature_cache(images, compute)

    def network(self) -> nn.Module:
        """Normalised images -> logits as a plain module (export traces it; a LightningModule
        outside a Trainer cannot be)."""
        return Network(
            self.backbone, self.head, self.flip_invariant, self.hparams.num_heads, self.backbone_name
        ).eval()

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, targets = batch
        logits = self(images)
        return self.criterion(logits, targets), logits, targets

    # ---- train --------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Each head learns from its own loss (their mean is the loss logged)."""
        images, targets = batch
        loss_targets = targets
        if self.mixup is not None:
            images, loss_targets = _mix(self.mixup, images, targets)
        per_head = self._logits_per_head(images)
        heads = per_head.shape[1]
        loss = self.criterion(per_head.flatten(0, 1), loss_targets.repeat_interleave(heads, dim=0))
        logits = per_head.mean(1)
        self.train_loss(loss)
        self.train_acc(logits, targets)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    # ---- validation / test ----------------------------------------------------------------------
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Returns the class probabilities: callbacks (review images) get them as `outputs`."""
        loss, logits, targets = self._shared_step(batch)
        probs = logits.softmax(dim=1)
        self.val_loss.update(loss, weight=len(targets))
        self.val_metrics.update(probs, targets)
        return probs

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Returns the class probabilities (predictions_test.csv: nested CV's outer-fold scores)."""
        loss, logits, targets = self._shared_step(batch)
        probs = logits.softmax(dim=1)
        self.test_loss.update(loss, weight=len(targets))
        self.test_metrics.update(probs, targets)
        return probs

    def _epoch_metrics(
        self, stage: str, loss: MeanMetric, metrics: MetricCollection
    ) -> dict[str, torch.Tensor]:
        values = metrics.compute()
        result = {f"{stage}/loss": loss.compute()}
        for name, value in values.items():
            result[f"{stage}/{name}"] = value[self.positive_index] if name in PER_CLASS else value
        loss.reset()
        metrics.reset()
        return result

    def on_validation_epoch_end(self) -> None:
        with warnings.catch_warnings():
            if self.trainer.sanity_checking:  # its two batches may hold one class: AUROC says so
                warnings.filterwarnings("ignore", message=SINGLE_CLASS_WARNING, category=UserWarning)
            values = self._epoch_metrics("val", self.val_loss, self.val_metrics)
        self.log_dict(values, prog_bar=False)
        if self.trainer.sanity_checking:
            return
        for name, best in zip(self.best_tracked, self.val_best, strict=True):
            best(values[name])
            self.log(f"{name}_best", best.compute(), prog_bar=name == self.hparams.monitor)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._epoch_metrics("test", self.test_loss, self.test_metrics))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).softmax(dim=1)

    # ---- optimisation ---------------------------------------------------------------------------
    def _parameter_groups(self) -> list[dict[str, Any]]:
        """The head at the optimizer's lr, the pretrained backbone at `backbone_lr_scale` times it
        (small data sets: the features move less than the new head); frozen parameters left out
        (all of the backbone's when the scale is 0)."""
        base_lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        scale = self.hparams.backbone_lr_scale
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        rest = [
            p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("backbone.")
        ]
        if scale == 1.0 or base_lr is None:
            return [{"params": backbone + rest}]
        groups = [{"params": rest}]
        if backbone:
            groups.append({"params": backbone, "lr": base_lr * scale})
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self._parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer), "interval": "epoch"},
        }


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> DefectClassifier:
    """The one way to load a checkpoint of this project for scoring: weights only (no pickled code),
    never a look-up of ImageNet or `weights_path` files, never compiled; in eval mode on `device`.
    `model.hparams` holds the constructor arguments (preprocessing included), `model.mean/std`
    the input normalisation."""
    hparams, state = read_checkpoint(path)
    accepted = inspect.signature(DefectClassifier.__init__).parameters
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    kwargs.update(pretrained=False, require_pretrained=False, weights_path=None, compile=False)
    kwargs["contract"] = ModelContract.from_hparams(hparams)  # old checkpoints: their flat keys
    model = DefectClassifier(**kwargs)
    model.load_state_dict(state)
    # the stored facts (weights source), not this construction's
    model.pretrained_loaded = bool(hparams.get("pretrained_loaded", False))
    model.weights_source = hparams.get("weights_source")
    return model.to(device).eval()

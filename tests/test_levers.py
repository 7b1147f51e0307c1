"""Training levers of the offline recipe: the backbone's own learning rate and warmup + cosine."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from railway_defect.models.contract import ModelContract
from railway_defect.models.module import DefectClassifier, FrozenFeatureCache
from railway_defect.models.network import FLIP_AXES
from railway_defect.models.schedules import warmup_cosine
from railway_defect.utils.errors import UserError


def _model(**kwargs: object) -> DefectClassifier:
    return DefectClassifier(
        "resnet18",
        ModelContract.for_backbone("resnet18", ["Defective", "Non defective"], "Defective"),
        pretrained=False,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        **kwargs,
    )


def test_backbone_learns_at_its_scale_of_the_heads_lr() -> None:
    optimizer = _model(backbone_lr_scale=0.1).configure_optimizers()
    head, backbone = optimizer.param_groups
    assert head["lr"] == pytest.approx(1e-3) and backbone["lr"] == pytest.approx(1e-4)
    model = _model()
    (group,) = model.configure_optimizers().param_groups
    assert len(group["params"]) == len([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(UserError, match="backbone_lr_scale=-0.1 must be >= 0"):
        _model(backbone_lr_scale=-0.1)
    with pytest.raises(UserError, match="decision_threshold=1.0 must be between 0 and 1"):
        ModelContract.for_backbone("resnet18", ["Defective", "Non defective"], "Defective", threshold=1.0)


def test_a_zero_backbone_lr_scale_trains_the_head_alone_on_fixed_pretrained_features() -> None:
    """Linear probe, through Lightning's own loops (validation included): the backbone's weights and
    batch-norm statistics do not move, the head's do."""
    model = _model(backbone_lr_scale=0)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head[1].weight.clone()
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
    trainer = Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running means/vars included
    assert not torch.equal(head_before, model.head[1].weight)
    (group,) = trainer.optimizers[0].param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in model.head.parameters()}
    model.train()  # e.g. after Grad-CAM, which restores the mode it found
    assert model.head.training and not model.backbone.training


def test_head_norm_standardises_features_by_batch_and_keeps_a_last_batch_of_one() -> None:
    """A split of 4k + 1 images ends each epoch with a batch of one, which has no batch statistics:
    it trains on the running ones instead of failing."""
    model = _model(backbone_lr_scale=0, head_norm=True)
    norm = model.head[0]
    data = TensorDataset(torch.randn(9, 3, 64, 64), torch.tensor([0, 1] * 4 + [0]))
    trainer = Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    assert int(norm.num_batches_tracked) == 4  # two batches of 4 per epoch; the batch of one adds none
    model.eval()
    with torch.no_grad():
        features = model.backbone(data.tensors[0])
        expected = (features - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
        torch.testing.assert_close(model.head[:2](features), expected)


def test_flip_invariant_model_scores_a_photo_and_its_flips_alike_and_each_photo_alone() -> None:
    """model.flip_invariant: the same score for the photo and its horizontal, vertical and double flip,
    and each photo of a batch scored from its own four views only."""
    images = torch.randn(3, 3, 64, 64)
    model = _model(flip_invariant=True).eval()
    plain_model = _model().eval()
    with torch.no_grad():
        scores = model(images)
        for flipped in (images.flip(-1), images.flip(-2), images.flip(-2, -1)):
            torch.testing.assert_close(model(flipped), scores, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(images[1:2]), scores[1:2], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(plain_model(images.flip(-1)), plain_model(images), atol=1e-4)


def test_each_of_several_heads_learns_as_it_would_alone_and_the_model_scores_their_mean() -> None:
    """model.num_heads: heads initialised differently, each trained on its own loss (trained on their
    mean logit they would be one linear layer); the model's logits, and its exported network's, are
    the heads' mean."""
    probe = dict(backbone_lr_scale=0, head_norm=True)
    several = _model(num_heads=3, **probe)
    linear = several.head[-1]
    assert linear.out_features == 3 * 2 and not torch.allclose(linear.weight[:2], linear.weight[2:4])
    alone = _model(**probe)
    alone.backbone.load_state_dict(several.backbone.state_dict())
    with torch.no_grad():  # the second head's initial weights
        alone.head[-1].weight.copy_(linear.weight[2:4])
        alone.head[-1].bias.copy_(linear.bias[2:4])
    _fit_counting_backbone_images(several)
    _fit_counting_backbone_images(alone)
    torch.testing.assert_close(linear.weight[2:4], alone.head[-1].weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(linear.bias[2:4], alone.head[-1].bias, atol=1e-5, rtol=1e-4)

    images = torch.randn(4, 3, 32, 32)
    several.eval()
    with torch.no_grad():
        per_head = several.head(several.backbone(images)).unflatten(1, (3, 2))
        torch.testing.assert_close(several(images), per_head.mean(1))
        torch.testing.assert_close(several.network()(images), per_head.mean(1))
    with pytest.raises(UserError, match="num_heads=0 must be a whole number >= 1"):
        _model(num_heads=0)


def _fit_counting_backbone_images(model: DefectClassifier, epochs: int = 3) -> int:
    """Fits on 8 training and 4 validation images (fixed tensors, no augmentation); returns how many
    images the backbone computed."""
    seen = [0]
    model.backbone.register_forward_hook(
        lambda module, inputs, output: seen.__setitem__(0, seen[0] + len(output))
    )
    generator = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(8, 3, 32, 32, generator=generator), torch.tensor([0, 1] * 4))
    val = TensorDataset(torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1] * 2))
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    torch.manual_seed(0)
    trainer.fit(model, DataLoader(train, batch_size=3, shuffle=True), DataLoader(val, batch_size=3))
    return seen[0]


def test_a_frozen_backbone_computes_each_image_once_per_fit_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Feature cache: a linear probe without random augmentation runs the backbone once per distinct
    image (a fit of 3 epochs, 12 images: 12 images, not 3 x 12 + the sanity check's) and learns
    exactly what it learns without the cache; a backbone that learns is run every time."""
    probe = dict(backbone_lr_scale=0, flip_invariant=True, head_norm=True)
    cached = _model(**probe)
    uncached = _model(**probe)
    uncached.load_state_dict(cached.state_dict())
    assert _fit_counting_backbone_images(cached) == 12 * len(FLIP_AXES)
    assert cached.feature_cache is None  # released with the fit
    monkeypatch.setattr(DefectClassifier, "on_fit_start", lambda self: None)
    assert _fit_counting_backbone_images(uncached) > 3 * 12 * len(FLIP_AXES)
    for name, value in cached.head.state_dict().items():
        torch.testing.assert_close(value, uncached.head.state_dict()[name], atol=1e-5, rtol=1e-4)
    monkeypatch.undo()
    assert _fit_counting_backbone_images(_model(backbone_lr_scale=1.0)) > 3 * 12


def test_feature_cache_computes_a_repeated_image_once_and_stops_growing_at_its_size() -> None:
    calls: list[int] = []

    def compute(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return images.flatten(1)[:, :4] * 2

    images = torch.randn(3, 3, 8, 8)
    cache = FrozenFeatureCache(max_bytes=2 * 4 * 4)  # room for two features of 4 floats
    batch = torch.cat([images, images[:1]])  # the first image twice
    torch.testing.assert_close(cache(batch, compute), compute(batch))
    assert calls[0] == 3 and len(cache.features) == 2 and cache.bytes == 32
    torch.testing.assert_close(cache(images, compute), compute(images))
    assert calls[2] == 1  # the one image the cache had no room for


def test_feature_cache_keys_an_image_by_its_values_in_any_memory_layout() -> None:
    """The same pixels hit the cache whatever their layout (a channels_last batch, a slice); one
    value changed by 1e-4 is another image."""
    calls: list[int] = []

    def compute(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return images.mean(dim=(2, 3))

    images = torch.randn(2, 3, 16, 16)
    cache = FrozenFeatureCache()
    cache(images, compute)
    cache(images.contiguous(memory_format=torch.channels_last), compute)
    cache(torch.cat([images, images])[2:], compute)
    assert calls == [2]
    nudged = images.clone()
    nudged[1, 2, 15, 15] += 1e-4
    torch.testing.assert_close(cache(nudged, compute), nudged.mean(dim=(2, 3)))
    assert calls == [2, 1]


def _batch_norm_state(model: DefectClassifier) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.clone()
        for name, module in model.backbone.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
        for key, value in module.state_dict().items()
    }


@pytest.mark.parametrize(
    ("unfreeze_at", "scheduler"),
    [
        (2, partial(warmup_cosine, warmup_epochs=1, max_epochs=2)),
        (1, partial(warmup_cosine, warmup_epochs=1, max_epochs=2)),
        (1, partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=2)),
    ],
)
def test_freeze_then_unfreeze_keeps_the_backbones_batch_norm_as_pretrained(
    unfreeze_at: int, scheduler: Any
) -> None:
    """callbacks=finetune (train_bn false), through Lightning's loops with validation and an lr
    scheduler: while the head learns alone nothing in the backbone moves; after unfreezing its
    convolutions learn but its batch-norm weights and statistics stay the pretrained ones
    (Lightning's own callback trains them), and the scheduler steps on with the backbone's new
    param group at the lr the callback gives it."""
    from railway_defect.callbacks.finetuning import BackboneFinetuning

    model = _model(scheduler=scheduler)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    norm_before = _batch_norm_state(model)
    data = TensorDataset(torch.randn(8, 3, 64, 64), torch.tensor([0, 1] * 4))
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=unfreeze_at, train_bn=False)],
    )
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    after = model.backbone.state_dict()
    norm_after = _batch_norm_state(model)
    assert all(torch.equal(norm_before[k], norm_after[k]) for k in norm_before)
    moved = [k for k in backbone_before if not torch.equal(backbone_before[k], after[k])]
    assert moved == [] if unfreeze_at == 2 else "conv1.weight" in moved
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == (1 if unfreeze_at == 2 else 2)
    model.train()  # e.g. after Grad-CAM, which restores the mode it found
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.backbone.training == (unfreeze_at == 1) and model.head.training


def test_warmup_then_cosine_to_zero() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, warmup_epochs=2, max_epochs=6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[3] < lrs[2] and lrs[5] < lrs[4] < lrs[3]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_mixup_mixes_pairs_into_soft_targets_and_keeps_an_odd_last_image() -> None:
    from railway_defect.models.module import _batch_mixer, _mix

    assert _batch_mixer(0.0, 0.0, 2) is None
    with pytest.raises(UserError, match="cutmix_alpha=0.0 must be >= 0"):
        _batch_mixer(-1.0, 0.0, 2)
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(5)])
    targets = torch.tensor([0, 1, 0, 1, 1])
    mixed, soft = _mix(_batch_mixer(0.4, 0.0, 2), images, targets)
    assert mixed.shape == images.shape and soft.shape == (5, 2)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(5))
    torch.testing.assert_close(mixed[4], images[4])  # the odd one out is not mixed
    torch.testing.assert_close(soft[4], torch.tensor([0.0, 1.0]))
    assert not torch.equal(mixed[:4], images[:4])  # the pairs are


def test_fits_of_the_same_frozen_backbone_share_its_feature_cache() -> None:
    """The folds of a sweep run one after another in one process (Hydra's basic launcher): a second
    fit of a probe on the very same backbone weights computes no image again, and its test stage
    reads the cache too; a backbone whose weights differ in one value computes every image."""
    probe = dict(backbone_lr_scale=0, flip_invariant=True, head_norm=True)
    first, second, other = _model(**probe), _model(**probe), _model(**probe)
    with torch.no_grad():
        next(first.backbone.parameters()).add_(torch.rand(()) + 0.5)  # weights no other test fitted
    second.load_state_dict(first.state_dict())
    other.load_state_dict(first.state_dict())
    assert _fit_counting_backbone_images(first) == 12 * len(FLIP_AXES)
    assert _fit_counting_backbone_images(second) == 0
    with torch.no_grad():
        weight = next(other.backbone.parameters())
        weight[(0,) * weight.dim()] += 1e-3
    assert _fit_counting_backbone_images(other) == 12 * len(FLIP_AXES)

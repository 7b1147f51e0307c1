"""Grad-CAM works for every backbone of the factory and leaves the model as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from railway_defect.models.backbones import BACKBONES
from railway_defect.models.contract import ModelContract
from railway_defect.models.gradcam import gradcam_heatmaps, overlay
from railway_defect.models.module import DefectClassifier
from tests.helpers import CLASSES


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_heatmaps_for_every_backbone(backbone: str) -> None:
    model = DefectClassifier(
        backbone, ModelContract.for_backbone(backbone, CLASSES, "Defective"), pretrained=False
    )
    model.train()
    heatmaps = gradcam_heatmaps(model, torch.randn(2, 3, 64, 64), [0, 1])
    assert heatmaps.shape == (2, 64, 64)
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert model.training  # the model's mode is restored


def test_heatmaps_of_a_frozen_backbone_during_training() -> None:
    """model.backbone_lr_scale=0: no parameter of the backbone has gradients, the review images still
    need its activations' gradients. Seeded: an untrained model's map may be all zero by chance."""
    torch.manual_seed(0)
    model = DefectClassifier(
        "resnet18",
        ModelContract.for_backbone("resnet18", CLASSES, "Defective"),
        pretrained=False,
        backbone_lr_scale=0,
    )
    model.setup("fit")
    model.train()
    heatmaps = gradcam_heatmaps(model, torch.randn(2, 3, 64, 64), [0, 1])
    assert heatmaps.shape == (2, 64, 64) and heatmaps.max() > 0.0
    assert not model.backbone.training and not any(p.requires_grad for p in model.backbone.parameters())


def test_overlay_keeps_the_image_shape() -> None:
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    result = overlay(image, np.ones((20, 30), dtype=np.float32))
    assert result.shape == (20, 30, 3) and result.dtype == np.uint8


def test_heatmaps_of_a_flip_invariant_model_follow_the_photo() -> None:
    """model.flip_invariant: the model looks at four flipped views; its heatmap is drawn on the photo
    as given, so the heatmap of a flipped photo is the flipped heatmap."""
    model = DefectClassifier(
        "resnet18",
        ModelContract.for_backbone("resnet18", CLASSES, "Defective"),
        pretrained=False,
        flip_invariant=True,
    )
    images = torch.randn(2, 3, 64, 64)
    heatmaps = gradcam_heatmaps(model, images, [0, 1])
    assert heatmaps.shape == (2, 64, 64) and heatmaps.max() > 0.0
    flipped = gradcam_heatmaps(model, images.flip(-1), [0, 1])
    np.testing.assert_allclose(flipped, heatmaps[..., ::-1], atol=1e-4)

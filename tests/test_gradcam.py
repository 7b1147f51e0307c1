"""Grad-CAM works for every backbone of the factory and leaves the model as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from railway_defect.models.backbones import BACKBONES
from railway_defect.models.gradcam import gradcam_heatmaps, overlay
from railway_defect.models.module import DefectClassifier


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_heatmaps_for_every_backbone(backbone: str) -> None:
    model = DefectClassifier(backbone, ["Defective", "Non defective"], "Defective", pretrained=False)
    model.train()
    heatmaps = gradcam_heatmaps(model, torch.randn(2, 3, 64, 64), [0, 1])
    assert heatmaps.shape == (2, 64, 64)
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert model.training  # the model's mode is restored


def test_overlay_keeps_the_image_shape() -> None:
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    result = overlay(image, np.ones((20, 30), dtype=np.float32))
    assert result.shape == (20, 30, 3) and result.dtype == np.uint8

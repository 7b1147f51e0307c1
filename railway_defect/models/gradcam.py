"""Grad-CAM for any backbone of the factory: where in the photo the model looked, so a reviewer
can check it looks at the rail and fastener rather than at ballast. Uses pytorch-grad-cam on the
layer each backbone names as its `cam_layer`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from railway_defect.models.backbones import get_spec
from railway_defect.models.network import FLIP_AXES


def gradcam_heatmaps(model: nn.Module, images: torch.Tensor, class_indices: Sequence[int]) -> np.ndarray:
    """Heatmaps in [0, 1] of shape (B, H, W) explaining `class_indices[i]` for normalised `images[i]`.
    `model`: a DefectClassifier while it trains, or the Network that scores (models.network): both
    name their `backbone`, its `backbone_name` and whether they are `flip_invariant`."""
    layer = dict(model.backbone.named_modules())[get_spec(model.backbone_name).cam_layer]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), GradCAM(model=model, target_layers=[layer]) as cam:
            targets = [ClassifierOutputTarget(int(c)) for c in class_indices]
            # gradients from the input too, so that a frozen backbone (no parameter gradients) is explained
            heatmaps = cam(input_tensor=images.detach().clone().requires_grad_(True), targets=targets)
    finally:
        model.train(was_training)
    return _unflipped_mean(heatmaps) if model.flip_invariant else heatmaps


def _unflipped_mean(heatmaps: np.ndarray) -> np.ndarray:
    """A flip-invariant model looks at the views of FLIP_AXES (module.pooled_features): each view's
    heatmap flipped back onto the photo, then their mean."""
    views = np.split(heatmaps, len(FLIP_AXES))
    return np.mean([np.flip(view, axis=axes) for view, axes in zip(views, FLIP_AXES, strict=True)], axis=0)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 image with the heatmap (same H, W) blended in as a colour map."""
    rgb = image.astype(np.float32) / 255.0
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=1.0 - alpha)

"""The network of a DefectClassifier without Lightning: backbone, head and the images -> logits
path, and `load_network`, which builds it from a checkpoint. Scoring (predict, serve, triage) needs
no more, and importing Lightning and torchmetrics for it cost a serving process about 275 MB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from railway_defect.models.backbones import create_backbone
from railway_defect.models.contract import ModelContract
from railway_defect.utils.errors import UserError

# the views a flip_invariant model averages: the photo and its horizontal, vertical and double flip
# (image axes flipped in each)
FLIP_AXES: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


class FeatureNorm(nn.BatchNorm1d):
    """Features standardised by batch statistics in training and running ones in eval (no affine
    parameters); the last batch of an epoch may hold one image, which takes the running ones."""

    def __init__(self, num_features: int):
        super().__init__(num_features, affine=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training and features.shape[0] == 1:
            return nn.functional.batch_norm(
                features, self.running_mean, self.running_var, training=False, eps=self.eps
            )
        return super().forward(features)


def classifier_head(
    num_features: int, num_classes: int, dropout: float, norm: bool, num_heads: int
) -> nn.Sequential:
    """Features -> the logits of `num_heads` linear heads side by side (batch, heads x classes)."""
    layers = [FeatureNorm(num_features)] if norm else []
    return nn.Sequential(*layers, nn.Dropout(dropout), nn.Linear(num_features, num_classes * num_heads))


def logits_per_head(head_output: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(batch, heads x classes) -> (batch, heads, classes)."""
    return head_output.unflatten(1, (num_heads, -1))


def pooled_features(backbone: nn.Module, images: torch.Tensor, flip_invariant: bool) -> torch.Tensor:
    """The backbone's pooled features, or with `flip_invariant` their mean over the photo and its
    three flips (one backbone pass over the stacked views; the batch size stays dynamic for export)."""
    if not flip_invariant:
        return backbone(images)
    views = torch.cat([images.flip(axes) if axes else images for axes in FLIP_AXES])
    return backbone(views).unflatten(0, (len(FLIP_AXES), -1)).mean(0)


class Network(nn.Module):
    """DefectClassifier's images -> logits path without Lightning: what export traces and what
    predict, serve and triage score and explain with (`load_network`: no Lightning or torchmetrics
    imported). `backbone_name` names the factory's backbone (its Grad-CAM layer)."""

    def __init__(
        self, backbone: nn.Module, head: nn.Module, flip_invariant: bool, num_heads: int, backbone_name: str
    ):
        super().__init__()
        self.backbone, self.head, self.flip_invariant = backbone, head, flip_invariant
        self.num_heads, self.backbone_name = num_heads, backbone_name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.head(pooled_features(self.backbone, images, self.flip_invariant))
        return logits_per_head(output, self.num_heads).mean(1)


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint's constructor arguments and weights, weights only (no pickled code)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return dict(checkpoint["hyper_parameters"]), checkpoint["state_dict"]
    except Exception as e:
        raise UserError(f"{path} is not a checkpoint of this project ({type(e).__name__}: {e}).") from e


def load_network(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Network, ModelContract, dict[str, Any]]:
    """The checkpoint's network in eval mode on `device` (in the memory format it trained in), its
    contract and its constructor arguments; never a look-up of ImageNet weights."""
    hparams, state = read_checkpoint(path)
    contract = ModelContract.from_hparams(hparams)
    backbone = str(hparams["backbone"])
    created = create_backbone(backbone, False, None, False)
    head = classifier_head(
        created.spec.num_features,
        len(contract.class_names),
        float(hparams.get("dropout", 0.2)),
        bool(hparams.get("head_norm", False)),
        int(hparams.get("num_heads", 1)),
    )
    flip_invariant, num_heads = bool(hparams.get("flip_invariant", False)), int(hparams.get("num_heads", 1))
    network = Network(created.model, head, flip_invariant, num_heads, backbone)
    network.load_state_dict({k: v for k, v in state.items() if k.startswith(("backbone.", "head."))})
    if hparams.get("channels_last", True):
        network.to(memory_format=torch.channels_last)
    return network.to(device).eval(), contract, hparams

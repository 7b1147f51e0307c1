"""The backbone factory: every backbone builds, pretrained weights resolve from the local torch
hub cache, a missing file falls back (or fails when required), and the real EfficientNet-Lite0
ImageNet weights map onto timm's network."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from railway_defect.models.backbones import BACKBONES, build_imagenet_classifier, create_backbone, get_spec
from railway_defect.utils.errors import UserError


@pytest.fixture
def offline_torch_home(tmp_path: Path, monkeypatch) -> Path:
    """An empty TORCH_HOME, and downloads that fail like they do on a machine without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise OSError(f"network is unreachable: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch"


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_builds_features_of_its_declared_width(name: str) -> None:
    backbone = create_backbone(name, pretrained=False)
    backbone.model.eval()
    with torch.no_grad():
        features = backbone.model(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, get_spec(name).num_features)
    assert backbone.pretrained_loaded is False
    assert dict(backbone.model.named_modules())[backbone.spec.cam_layer] is not None


def test_unknown_backbone_lists_the_choices() -> None:
    with pytest.raises(UserError, match="resnet50"):
        get_spec("resnet51")


def test_pretrained_weights_resolve_from_the_torch_hub_cache(offline_torch_home: Path) -> None:
    reference = get_spec("resnet18").build()
    checkpoints = offline_torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / "resnet18-f37072fd.pth")
    backbone = create_backbone("resnet18", pretrained=True)
    assert backbone.pretrained_loaded is True
    assert backbone.weights_source == "imagenet"
    torch.testing.assert_close(backbone.model.conv1.weight, reference.conv1.weight)


def test_missing_weights_fall_back_with_one_clear_warning(offline_torch_home: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        backbone = create_backbone("resnet18", pretrained=True)
    assert backbone.pretrained_loaded is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "resnet18-f37072fd.pth" in warnings[0]
    assert str(offline_torch_home / "hub" / "checkpoints") in warnings[0]


def test_require_pretrained_turns_the_fallback_into_an_error(offline_torch_home: Path) -> None:
    with pytest.raises(UserError, match="resnet18-f37072fd.pth"):
        create_backbone("resnet18", pretrained=True, require_pretrained=True)


def test_weights_path_loads_strictly(tmp_path: Path) -> None:
    source = create_backbone("resnet18", pretrained=False).model
    torch.save(source.state_dict(), tmp_path / "backbone.pt")
    backbone = create_backbone("resnet18", pretrained=True, weights_path=tmp_path / "backbone.pt")
    assert backbone.pretrained_loaded is True
    assert backbone.weights_source == str(tmp_path / "backbone.pt")
    for a, b in zip(source.state_dict().values(), backbone.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_weights_path_for_another_architecture_is_a_clear_error(tmp_path: Path) -> None:
    torch.save(create_backbone("resnet18", pretrained=False).model.state_dict(), tmp_path / "r18.pt")
    with pytest.raises(UserError, match="does not fit backbone resnet50"):
        create_backbone("resnet50", pretrained=False, weights_path=tmp_path / "r18.pt")
    with pytest.raises(UserError, match="does not exist"):
        create_backbone("resnet18", weights_path=tmp_path / "nope.pt")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_imagenet_weights_recognise_a_cat(name: str) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    spec = get_spec(name)
    model = build_imagenet_classifier(name).eval()
    size = spec.input_size
    image = Image.fromarray(skimage_data.chelsea()).resize((size, size), Image.Resampling.BICUBIC)
    x = (np.asarray(image, dtype=np.float32) / 255 - np.array(spec.mean)) / np.array(spec.std)
    with torch.no_grad():
        probabilities = model(torch.from_numpy(x).permute(2, 0, 1)[None].float()).softmax(dim=1)[0]
    top5 = probabilities.topk(5).indices.tolist()
    assert top5[0] in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert probabilities[281:286].sum() > 0.8


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_backbone_loads_the_shipped_weights_offline(
    offline_torch_home: Path, name: str
) -> None:
    backbone = create_backbone(name, pretrained=True, require_pretrained=True)
    assert backbone.pretrained_loaded is True

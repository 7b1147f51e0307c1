"""model.compile=true compiles the backbone in place: checkpoints keep the plain parameter names and
load into a model built with compile on or off."""

from __future__ import annotations

from pathlib import Path

import torch

from railway_defect.inference.model import CheckpointPredictor
from railway_defect.models.module import DefectClassifier

CLASSES = ["Defective", "Non defective"]


def classifier(compile: bool) -> DefectClassifier:
    return DefectClassifier("resnet18", CLASSES, "Defective", pretrained=False, compile=compile)


def test_compiled_model_saves_plain_keys_that_load_both_ways(tmp_path: Path) -> None:
    compiled, plain = classifier(True), classifier(False)
    assert not isinstance(compiled.backbone, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.backbone._compiled_call_impl is not None  # really compiled
    assert plain.backbone._compiled_call_impl is None
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    assert list(compiled.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(compiled.state_dict())  # strict
    classifier(True).load_state_dict(plain.state_dict())

    compiled.hparams.update(input_size=64, cache_size=72)
    path = tmp_path / "compiled.ckpt"
    torch.save({"hyper_parameters": dict(compiled.hparams), "state_dict": compiled.state_dict()}, path)
    predictor = CheckpointPredictor(path, "sha")
    assert predictor.model.backbone._compiled_call_impl is None  # scoring does not compile
    for name, value in compiled.state_dict().items():
        assert torch.equal(predictor.model.state_dict()[name], value)


def test_compile_is_off_by_default_in_every_model_config(compose_train) -> None:
    for backbone in ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_lite0"):
        assert compose_train(f"model={backbone}").model.compile is False
    assert compose_train("model.compile=true").model.compile is True

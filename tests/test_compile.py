"""model.compile=true compiles the backbone in place: checkpoints keep the plain parameter names and
load into a model built with compile on or off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from railway_defect.inference.model import CheckpointPredictor
from railway_defect.models.contract import ModelContract
from railway_defect.models.module import DefectClassifier
from railway_defect.training.run import run_training
from tests.helpers import FAST

CLASSES = ["Defective", "Non defective"]


def classifier(compile: bool) -> DefectClassifier:
    return DefectClassifier(
        "resnet18",
        ModelContract.for_backbone("resnet18", CLASSES, "Defective"),
        pretrained=False,
        compile=compile,
    )


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


@pytest.mark.slow
def test_compiled_training_run_gives_a_checkpoint_that_scores_uncompiled(
    compose_train, tiny_dataset: Path
) -> None:
    """model.compile=true really trains through torch.compile (Inductor, C++ on the CPU), and the
    best checkpoint gives the same outputs in a plain model as in the compiled one."""
    cfg = compose_train(*FAST, f"data.root={tiny_dataset}", "model.compile=true", "trainer.max_epochs=1")
    run_training(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    best = metrics["checkpoints"]["best"]
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)

    x = torch.rand(2, 3, 64, 64)
    compiled = DefectClassifier.load_from_checkpoint(best, pretrained=False).eval()
    assert compiled.backbone._compiled_call_impl is not None
    plain = CheckpointPredictor(Path(best), "sha").model
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-4, atol=1e-4)

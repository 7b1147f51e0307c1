"""Export through torch's current APIs: ONNX by torch.onnx.export(dynamo=True) with its opset,
dynamic batch axis, metadata and parity check; TorchScript without its deprecation notices but
with its tracer warnings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from railway_defect.inference.exporting import MIN_OPSET, export_model
from railway_defect.inference.model import METADATA_KEY, load_predictor
from railway_defect.training.run import run_training
from railway_defect.utils.errors import UserError
from railway_defect.utils.warning_filters import torchscript_deprecation_silenced
from tests.helpers import FAST, make_split_dataset


@pytest.fixture
def checkpoint(compose_train, tmp_path: Path) -> Path:
    data = make_split_dataset(tmp_path / "data", {"Train": 2, "Validation": 2})
    cfg = compose_train(*FAST, "trainer.max_epochs=1", "logger=[]", f"data.root={data}")
    run_training(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"


def deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]


def test_onnx_export_uses_the_maintained_exporter(checkpoint: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_model(str(checkpoint), "onnx", tmp_path / "model.onnx")
    assert not deprecations(caught)
    assert result["opset"] == MIN_OPSET and result["max_abs_diff"] <= 1e-4
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [MIN_OPSET]
    (images,) = model.graph.input
    assert images.name == "images" and images.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert [o.name for o in model.graph.output] == ["logits"]
    metadata = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    assert metadata["class_names"] == ["Defective", "Non defective"] and metadata["opset"] == MIN_OPSET
    predictor = load_predictor(tmp_path / "model.onnx")
    assert predictor.kind == "onnx" and predictor.contract.input_size == 64
    # one contract: the export's is the checkpoint's, at the threshold the model is used at
    source = load_predictor(checkpoint)
    assert predictor.contract == source.contract.with_rule(source.rule)
    with pytest.raises(UserError, match=f"opset={MIN_OPSET} or higher"):
        export_model(str(checkpoint), "onnx", tmp_path / "old.onnx", opset=17)
    assert not (tmp_path / "old.onnx").exists()


def test_torchscript_export_hides_only_its_deprecation_notices(checkpoint: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_model(str(checkpoint), "torchscript", tmp_path / "model.pt")
    assert not deprecations(caught) and result["max_abs_diff"] <= 1e-4

    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torchscript_deprecation_silenced():
            torch.jit.trace(DataDependent(), torch.ones(2))
    assert not deprecations(caught)
    assert any(issubclass(w.category, torch.jit.TracerWarning) for w in caught)


def test_export_of_a_flip_invariant_model_averages_the_flips_as_the_checkpoint(
    checkpoint: Path, tmp_path: Path
) -> None:
    """model.flip_invariant lives in the forward pass: the exported graph scores the mean of the four
    flipped views too (a head sharpened here, so that one view alone would score differently)."""
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    stored["hyper_parameters"]["flip_invariant"] = True
    weight = stored["state_dict"]["head.1.weight"]
    stored["state_dict"]["head.1.weight"] = (
        torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    )
    torch.save(stored, tmp_path / "flip.ckpt")
    for fmt, name in (("onnx", "flip.onnx"), ("torchscript", "flip.pt")):
        assert export_model(str(tmp_path / "flip.ckpt"), fmt, tmp_path / name)["max_abs_diff"] <= 1e-4
        exported = load_predictor(tmp_path / name)
        batch = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
        for axis in (-1, -2):
            flipped = np.ascontiguousarray(np.flip(batch, axis=axis))
            np.testing.assert_allclose(
                exported.probabilities(flipped), exported.probabilities(batch), atol=1e-5
            )

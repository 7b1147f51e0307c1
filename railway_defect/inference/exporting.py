"""Export a checkpoint as ONNX (dynamic batch axis) or TorchScript. The file carries what predict
needs besides the weights: classes, input size, cache size, mean/std, threshold and temperature
(ONNX metadata, or an extra file inside the TorchScript archive)."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from railway_defect.errors import UserError
from railway_defect.inference.model import (
    METADATA_KEY,
    CheckpointPredictor,
    EnsemblePredictor,
    Predictor,
    load_predictor,
)
from railway_defect.outputs import atomic_path

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def export_metadata(predictor: Predictor) -> dict[str, Any]:
    return {
        **asdict(predictor.info),
        "threshold": predictor.calibration.threshold,
        "temperature": predictor.calibration.temperature,
        "calibration": predictor.calibration.details,
        "source_checkpoint": str(predictor.path),
        "source_sha256": predictor.sha256,
        "exported_at": datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
    }


def _write_onnx(
    network: nn.Module, example: torch.Tensor, metadata: dict[str, Any], path: Path, opset: int
) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        torch.onnx.export(
            network,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
        )
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _write_torchscript(
    network: nn.Module, example: torch.Tensor, metadata: dict[str, Any], path: Path
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript announces its deprecation
        traced = torch.jit.trace(network, example)
        torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})


def export_model(
    ckpt_path: str | None,
    format: str = "onnx",
    output: str | Path | None = None,
    opset: int = 17,
    check: bool = True,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Write the export (atomically) and, with `check`, compare its probabilities to PyTorch's."""
    if format not in FORMATS:
        raise UserError(f"format={format} is not one of {', '.join(FORMATS)}.")
    predictor = load_predictor(ckpt_path, device="cpu")
    if not isinstance(predictor, (CheckpointPredictor, EnsemblePredictor)):
        raise UserError(
            f"{predictor.path} is already an export; give the training checkpoint (.ckpt), run or sweep."
        )
    default = predictor.path / "ensemble" if predictor.path.is_dir() else predictor.path
    output = Path(output) if output else default.with_suffix(FORMATS[format])
    output.parent.mkdir(parents=True, exist_ok=True)
    network = predictor.network()
    size = predictor.info.input_size
    example = torch.randn(2, 3, size, size)
    metadata = export_metadata(predictor)
    with atomic_path(output) as tmp:
        if format == "onnx":
            _write_onnx(network, example, metadata, tmp, opset)
        else:
            _write_torchscript(network, example, metadata, tmp)
    result: dict[str, Any] = {"output": str(output), "format": format, "metadata": metadata}
    if check:
        result["max_abs_diff"] = check_parity(predictor, output, tolerance)
    log.info("Exported %s to %s.", predictor.path, output)
    return result


def check_parity(reference: Predictor, exported: Path, tolerance: float, batch: int = 3) -> float:
    """Largest difference of class probabilities between the checkpoint and the export, on a random
    batch whose size differs from the one traced (so the dynamic batch axis is exercised)."""
    size = reference.info.input_size
    images = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    candidate = load_predictor(exported, device="cpu")
    diff = float(np.abs(candidate.probabilities(images) - reference.probabilities(images)).max())
    if diff > tolerance:
        raise UserError(
            f"{exported} differs from the checkpoint by {diff:.2e} (> {tolerance:.0e}) in probability."
        )
    log.info("Parity with the checkpoint: max |Δp| = %.2e over a batch of %d.", diff, batch)
    return diff

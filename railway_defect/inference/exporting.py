"""Export a checkpoint as ONNX (dynamic batch axis) or TorchScript. ONNX goes through torch's
maintained exporter, `torch.onnx.export(dynamo=True)` (torch.export + onnxscript); TorchScript is
deprecated by torch and stays only while torch supports it. The file carries what predict needs
besides the weights: classes, input size, cache size, mean/std, threshold and temperature (ONNX
metadata, or an extra file inside the TorchScript archive)."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from railway_defect.inference.model import (
    METADATA_KEY,
    CheckpointPredictor,
    EnsemblePredictor,
    Predictor,
    load_predictor,
)
from railway_defect.utils.errors import UserError
from railway_defect.utils.outputs import atomic_path
from railway_defect.utils.warning_filters import torchscript_deprecation_silenced

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# the lowest opset torch.onnx.export(dynamo=True) writes without a (lossy) version conversion
MIN_OPSET = 18


def export_metadata(predictor: Predictor) -> dict[str, Any]:
    return {
        # the contract, with the threshold the model is used at (evaluate's, else the recipe's)
        **predictor.contract.with_rule(predictor.rule).to_dict(),
        # its name in exports written before the contract (decode_size), for readers of those
        "cache_size": predictor.contract.decode_size,
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
) -> int:
    """Export with torch's maintained exporter (torch.export + onnxscript); returns the opset
    written, which is lower than `opset` only where the exporter could not convert its graph."""
    import onnx

    if opset < MIN_OPSET:
        raise UserError(
            f"opset={opset}: the ONNX exporter (torch.export based) writes opset {MIN_OPSET} or newer, "
            f"which onnxruntime reads from 1.14 on; use opset={MIN_OPSET} or higher."
        )
    try:
        import onnxscript  # noqa: F401  (the exporter's ONNX builder; named here for a clear error)
    except ImportError as e:
        raise UserError(f"format=onnx needs the onnxscript package ({e}): pip install onnxscript.") from e
    torch.onnx.export(
        network,
        (example,),
        str(path),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        # the example has 2 images; min=1 so that a single image is a valid batch too
        # by position: the network's own argument name does not matter
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        opset_version=opset,
        external_data=False,  # one self-contained file, as predict and serve expect
        verbose=False,
    )
    model = onnx.load(str(path))
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if written != opset:
        log.warning(
            "The exporter could not convert the graph to opset %d; it wrote opset %d.", opset, written
        )
    metadata = {**metadata, "opset": written}
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return written


def _write_torchscript(
    network: nn.Module, example: torch.Tensor, metadata: dict[str, Any], path: Path
) -> None:
    """TorchScript is deprecated in torch (its calls say so on every use) but still supported; it
    stays for users whose runtime is libtorch, and goes when torch removes it."""
    with torchscript_deprecation_silenced():
        traced = torch.jit.trace(network, example)
        torch.jit.save(traced, str(path), _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})


def export_model(
    ckpt_path: str | None,
    format: str = "onnx",
    output: str | Path | None = None,
    opset: int = MIN_OPSET,
    check: bool = True,
    tolerance: float = 1e-4,
    quantize: str | None = None,
    calibration_data: str | Path | None = None,
    calibration_images: int = 100,
) -> dict[str, Any]:
    """Write the export (atomically) and, with `check`, compare its probabilities to PyTorch's.
    `quantize=int8` (ONNX only) writes the statically quantized model instead of the fp32 one."""
    if format not in FORMATS:
        raise UserError(f"format={format} is not one of {', '.join(FORMATS)}.")
    if quantize is not None:
        return export_quantized(
            ckpt_path, output, opset, check, tolerance, quantize, calibration_data, calibration_images, format
        )
    predictor = load_predictor(ckpt_path, device="cpu")
    if not isinstance(predictor, (CheckpointPredictor, EnsemblePredictor)):
        raise UserError(
            f"{predictor.path} is already an export; give the training checkpoint (.ckpt), run or sweep."
        )
    default = predictor.path / "ensemble" if predictor.path.is_dir() else predictor.path
    output = Path(output) if output else default.with_suffix(FORMATS[format])
    output.parent.mkdir(parents=True, exist_ok=True)
    network = predictor.network()
    size = predictor.contract.input_size
    example = torch.randn(2, 3, size, size)
    metadata = export_metadata(predictor)
    result: dict[str, Any] = {"output": str(output), "format": format, "metadata": metadata}
    with atomic_path(output) as tmp:
        if format == "onnx":
            result["opset"] = _write_onnx(network, example, metadata, tmp, opset)
        else:
            _write_torchscript(network, example, metadata, tmp)
    if check:
        result["max_abs_diff"] = check_parity(predictor, output, tolerance)
    log.info("Exported %s to %s.", predictor.path, output)
    return result


def check_parity(reference: Predictor, exported: Path, tolerance: float, batch: int = 3) -> float:
    """Largest difference of class probabilities between the checkpoint and the export, on a random
    batch whose size differs from the one traced (so the dynamic batch axis is exercised)."""
    size = reference.contract.input_size
    images = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    candidate = load_predictor(exported, device="cpu")
    diff = float(np.abs(candidate.probabilities(images) - reference.probabilities(images)).max())
    if diff > tolerance:
        raise UserError(
            f"{exported} differs from the checkpoint by {diff:.2e} (> {tolerance:.0e}) in probability."
        )
    log.info("Parity with the checkpoint: max |Δp| = %.2e over a batch of %d.", diff, batch)
    return diff


# int8 moves probabilities by a few hundredths at most on real images; more is worth a warning
INT8_TOLERANCE = 0.05


def export_quantized(
    ckpt_path: str | None,
    output: str | Path | None,
    opset: int,
    check: bool,
    tolerance: float,
    quantize: str,
    calibration_data: str | Path | None,
    calibration_images: int,
    format: str = "onnx",
) -> dict[str, Any]:
    """The fp32 ONNX export (checked strictly), then its int8 version at `output` (default
    <checkpoint>.int8.onnx), compared with the checkpoint on real calibration images: int8 error is
    expected, so the difference is reported (a warning above INT8_TOLERANCE), never an error."""
    import tempfile

    from railway_defect.inference.quantize import QUANTIZE_MODES, calibration_files, quantize_onnx

    if quantize not in QUANTIZE_MODES:
        raise UserError(f"quantize={quantize} is not one of null, {', '.join(QUANTIZE_MODES)}.")
    if format != "onnx":
        raise UserError(f"quantize={quantize} needs format=onnx (ONNX Runtime quantizes it).")
    predictor = load_predictor(ckpt_path, device="cpu")
    if not isinstance(predictor, CheckpointPredictor):
        raise UserError(f"{predictor.path} is already an export; give the training checkpoint (.ckpt).")
    output = Path(output) if output else predictor.path.with_suffix(f".{quantize}.onnx")
    files = calibration_files(predictor.path, calibration_data, calibration_images)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        result = export_model(str(predictor.path), "onnx", fp32, opset, check, tolerance)
        with atomic_path(output) as out:
            quantization = quantize_onnx(fp32, out, files)
    result.pop("output")
    if "max_abs_diff" in result:
        result["fp32_max_abs_diff"] = result.pop("max_abs_diff")
    result.update(output=str(output), quantize=quantize, quantization=quantization)
    result["metadata"]["quantization"] = quantization
    if check:
        result["max_abs_diff"] = check_quantized_parity(predictor, output, files[:16])
    log.info("Exported %s to %s (%s).", predictor.path, output, quantize)
    return result


def check_quantized_parity(reference: CheckpointPredictor, exported: Path, files: list[Path]) -> float:
    """Largest difference of class probabilities between the checkpoint and the quantized export on
    real images (random noise lies outside the calibrated ranges and would say nothing)."""
    images = reference.preprocess([reference.decode(p.read_bytes()) for p in files])
    candidate = load_predictor(exported, device="cpu")
    diff = float(np.abs(candidate.probabilities(images) - reference.probabilities(images)).max())
    level = logging.WARNING if diff > INT8_TOLERANCE else logging.INFO
    log.log(level, "int8 vs the checkpoint: max |Δp| = %.3g over %d calibration images.", diff, len(files))
    return diff

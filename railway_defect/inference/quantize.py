"""Static int8 quantization of an exported ONNX model with ONNX Runtime (QDQ format), for fast CPU
scoring. Activation ranges are calibrated on training images preprocessed exactly like the
evaluation path (decode at the cache size, resize, normalise), so the ranges are those the model
sees in predict and serve; the result is an ordinary ONNX file that carries the same metadata."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from railway_defect.data.discovery import IMAGE_SUFFIXES
from railway_defect.data.images import DecodeError
from railway_defect.data.splits import SPLITS_FILE, read_split_record
from railway_defect.inference.model import METADATA_KEY, OnnxPredictor, file_sha256
from railway_defect.utils.errors import UserError
from railway_defect.utils.layout import run_dir_of

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8",)
# images per calibration batch: one, as the histogram calibrators (Percentile, Entropy) need
# batches of one shape, and it keeps memory low
CALIBRATION_BATCH = 1


def calibration_files(
    ckpt_path: str | Path, calibration_data: str | Path | None = None, count: int = 100, seed: int = 0
) -> list[Path]:
    """Up to `count` images to calibrate on: the files under `calibration_data` when given, else the
    training images the checkpoint's run recorded (<run>/splits.csv, root from data_report.json);
    a fixed-seed sample, so the same export gives the same file."""
    if count < 1:
        raise UserError(f"calibration_images={count} must be at least 1.")
    if calibration_data:
        folder = Path(calibration_data).expanduser()
        if not folder.is_dir():
            raise UserError(f"calibration_data={folder} is not a folder.")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        source = str(folder)
    else:
        run = run_dir_of(Path(ckpt_path))
        report = run / "data_report.json"
        try:
            root = Path(json.loads(report.read_text(encoding="utf-8"))["root"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"The training images of {ckpt_path} are unknown ({report}: {e}); pass "
                "calibration_data=FOLDER (a folder of images like those the model will score)."
            ) from e
        splits, _ = read_split_record(run / SPLITS_FILE, root)
        files = sorted(s.path for s in splits.get("train", []))
        source = f"{run / SPLITS_FILE} (train)"
    if not files:
        raise UserError(f"No images to calibrate on in {source}; pass calibration_data=FOLDER.")
    if len(files) > count:
        chosen = np.random.default_rng(seed).choice(len(files), size=count, replace=False)
        files = [files[i] for i in sorted(chosen)]
    log.info("Calibrating int8 ranges on %d images from %s.", len(files), source)
    return files


def _reader(predictor: OnnxPredictor, files: list[Path]) -> Any:
    """A CalibrationDataReader over `files`, decoded lazily one batch at a time (low memory)."""
    from onnxruntime.quantization import CalibrationDataReader

    class ImageReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.used = 0
            self.rewind()

        def _batches(self) -> Iterator[dict[str, np.ndarray]]:
            for start in range(0, len(files), CALIBRATION_BATCH):
                images = []
                for path in files[start : start + CALIBRATION_BATCH]:
                    try:
                        images.append(predictor.decode(path.read_bytes()))
                    except (OSError, DecodeError) as e:
                        log.warning("Not calibrating on %s: %s", path, e)
                if images:
                    self.used += len(images)
                    yield {predictor.input_name: predictor.preprocess(images)}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.iterator, None)

        def rewind(self) -> None:
            self.iterator = self._batches()

    return ImageReader()


def head_nodes(graph: Any) -> list[str]:
    """The nodes that write the graph's outputs (the logits), kept fp32."""
    outputs = {o.name for o in graph.output}
    return [n.name for n in graph.node if outputs & set(n.output)]


def shape_nodes(graph: Any) -> list[str]:
    """The nodes that only compute shapes (fed by Shape, constants and each other), kept fp32: int8
    rounds their small integers, e.g. run-time "same" padding amounts computed in float (the
    TorchScript-era export of efficientnet_lite0 had 3 of 5 Pads shifted a pixel, max |Δp| 0.24)."""
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    shape_values: set[str] = set()
    names = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        inputs = [i for i in node.input if i and i not in constants]
        fed = bool(inputs) and all(i in shape_values for i in inputs)
        if node.op_type in ("Shape", "Size") or fed:
            shape_values.update(node.output)
            names.append(node.name)
    return names


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: list[Path],
    per_channel: bool = True,
) -> dict[str, Any]:
    """Write the static int8 (QDQ) version of the exported `fp32_path` to `out_path`.

    Weights are int8 per output channel (one scale per convolution filter keeps small filters from
    being rounded away); activations uint8 (u8s8 is the fast path of ONNX Runtime's x86 kernels).
    The head (the node that writes the logits) stays fp32: it costs nothing, and quantized logits
    would move the probabilities by up to a quantization step near the threshold. So does the
    arithmetic on tensor shapes (see `shape_nodes`)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    predictor = OnnxPredictor(fp32_path, file_sha256(fp32_path))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX shape inference and graph folding first, as ONNX Runtime recommends before quantizing.
        # Its symbolic shape inference (meant for transformers) is skipped: it adds nothing to this
        # graph with ONNX Runtime 1.32 and fails on its Range node with 1.30.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        head, shapes = head_nodes(graph), shape_nodes(graph)
        reader = _reader(predictor, list(calibration_images))
        quantize_static(
            str(prepared),
            str(Path(tmp) / "int8.onnx"),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=head + shapes,
            calibrate_method=CalibrationMethod.MinMax,
        )
        if not reader.used:
            raise UserError("None of the calibration images could be decoded.")
        model = onnx.load(str(Path(tmp) / "int8.onnx"))
    return _save_with_metadata(model, predictor, out_path, per_channel, reader.used)


def _save_with_metadata(
    model: Any, predictor: OnnxPredictor, out_path: Path, per_channel: bool, images_used: int
) -> dict[str, Any]:
    """Save the int8 model with the fp32 export's metadata plus how it was quantized (returned)."""
    import onnx

    quantization = {
        "type": "int8",
        "format": "QDQ",
        "weights": "int8 per channel" if per_channel else "int8 per tensor",
        "activations": "uint8",
        "calibration_method": "MinMax",
        "calibration_images": images_used,
        "fp32_sha256": predictor.sha256,
    }
    metadata = json.loads(predictor.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    metadata["quantization"] = quantization
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
    onnx.save(model, str(out_path))
    return quantization

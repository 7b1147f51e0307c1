"""`export quantize=int8`: a tiny run's checkpoint quantized with ONNX Runtime, calibrated on the
training images its run recorded; the file scores like any ONNX export and stays close to fp32."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from railway_defect.inference.exporting import export_model
from railway_defect.inference.model import OnnxPredictor, load_predictor
from railway_defect.inference.predicting import run_prediction
from railway_defect.inference.quantize import calibration_files, head_nodes, shape_nodes
from railway_defect.training.run import run_training
from railway_defect.utils.errors import UserError
from tests.helpers import FAST, make_split_dataset, run_cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, data root) of a 2-epoch resnet18 run at 64 px on 16 training images."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from tests.helpers import CONF_DIR

    tmp = tmp_path_factory.mktemp("quantize")
    data = make_split_dataset(tmp / "data", {"Train": 8, "Validation": 3})
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*FAST, f"data.root={data}", "logger=csv"])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
    run_training(cfg)
    return tmp / "run" / "checkpoints" / "best.ckpt", data


def test_int8_export_loads_predicts_carries_metadata_and_stays_close_to_fp32(
    tiny_run: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, data = tiny_run
    out = tmp_path / "model.int8.onnx"
    result = run_cli(
        "railway_defect.export",
        f"ckpt_path={ckpt}",
        "quantize=int8",
        "calibration_images=8",
        f"output={out}",
        f"hydra.run.dir={tmp_path}/log",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fp32_line, int8_line = result.stdout.splitlines()[-2:]
    # the fp32 export underneath is checked strictly; int8's difference is reported, not failed
    assert fp32_line.startswith("fp32 parity with the checkpoint: max |Δp| = ")
    assert float(fp32_line.rsplit(" ", 1)[1]) <= 1e-4
    assert int8_line.startswith("int8 parity with the checkpoint: max |Δp| = ")
    assert float(int8_line.rsplit(" ", 1)[1]) < 0.05

    predictor = load_predictor(out, device="cpu")
    assert isinstance(predictor, OnnxPredictor)
    model = onnx.load(str(out))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # QDQ: really quantized
    metadata = json.loads({p.key: p.value for p in model.metadata_props}["railway_defect"])
    assert metadata["class_names"] == ["Defective", "Non defective"]
    assert metadata["input_size"] == 64 and metadata["cache_size"] == 72
    assert metadata["quantization"]["format"] == "QDQ" and metadata["quantization"]["calibration_images"] == 8
    assert predictor.contract.input_size == 64 and predictor.contract.positive_class == "Defective"

    reference = load_predictor(ckpt, device="cpu")
    photos = sorted((data / "Validation" / "Defective").iterdir())[:3]
    batch = reference.preprocess([reference.decode(p.read_bytes()) for p in photos])
    np.testing.assert_allclose(predictor.probabilities(batch), reference.probabilities(batch), atol=0.05)

    summary = run_prediction(str(out), str(data / "Validation"), tmp_path / "p.csv", progress=False)
    with (tmp_path / "p.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert summary.rows == len(rows) == 6 and not summary.failed


def test_calibration_images_come_from_the_runs_training_split_or_a_folder(
    tiny_run: tuple[Path, Path],
) -> None:
    ckpt, data = tiny_run
    files = calibration_files(ckpt, None, 100)
    assert len(files) == 16 and all(p.parent.parent.name == "Train" for p in files)
    assert calibration_files(ckpt, None, 5) == calibration_files(ckpt, None, 5)  # a fixed sample
    assert len(calibration_files(ckpt, data / "Validation", 100)) == 6
    with pytest.raises(UserError, match="calibration_data"):
        calibration_files(data / "elsewhere.ckpt", None, 10)  # no run beside it


def test_int8_needs_onnx_and_a_known_mode(tiny_run: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = tiny_run
    with pytest.raises(UserError, match="format=onnx"):
        export_model(str(ckpt), "torchscript", tmp_path / "m.pt", quantize="int8")
    with pytest.raises(UserError, match="quantize=int4"):
        export_model(str(ckpt), "onnx", tmp_path / "m.onnx", quantize="int4")


def test_shape_arithmetic_and_the_head_stay_out_of_quantization() -> None:
    """Run-time "same" padding computed in float (Shape -> ... -> Pad): int8 would round the pads."""
    from onnx import TensorProto, helper

    const = {
        "two_i": helper.make_tensor("two_i", TensorProto.INT64, [], [2]),
        "half": helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        "axes": helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
        "zeros": helper.make_tensor("zeros", TensorProto.INT64, [6], [0] * 6),
        "w": helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3, 3], [0.1] * 18),
    }
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "two_i"], ["h"], name="gather"),
        helper.make_node("Cast", ["h"], ["hf"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["hf", "half"], ["m"], name="mul"),
        helper.make_node("Ceil", ["m"], ["c"], name="ceil"),
        helper.make_node("Cast", ["c"], ["ci"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["ci", "axes"], ["u"], name="unsqueeze"),
        helper.make_node("Concat", ["zeros", "u", "u"], ["pads"], name="concat", axis=0),
        helper.make_node("Pad", ["x", "pads"], ["padded"], name="pad"),
        helper.make_node("Conv", ["padded", "w"], ["logits"], name="conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "pads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=list(const.values()),
    )
    assert shape_nodes(graph) == [n.name for n in nodes[:8]]
    assert head_nodes(graph) == ["conv"]

"""evaluate, predict, export and serve end to end, on one efficientnet_lite0 model trained here on
the real sample data (once for the module) and driven through the real command lines."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from railway_defect.data.images import decode_image
from railway_defect.inference.model import calibration_path, file_sha256, load_predictor
from railway_defect.inference.predicting import run_prediction
from tests.helpers import OFFLINE_ENV, REAL_DATA, run_cli, write_rgba, write_video

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not REAL_DATA.is_dir(), reason="the shared sample data set is not beside the project"),
]
VALIDATION = REAL_DATA / "Validation"
TARGET_RECALL = 0.95


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of efficientnet_lite0 (ImageNet weights shipped offline) after 3 epochs, with
    evaluate's calibration stored beside it."""
    run = tmp_path_factory.mktemp("train")
    result = run_cli(
        "railway_defect.train",
        "model=efficientnet_lite0",
        "trainer.max_epochs=3",
        "logger=csv",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    result = run_cli("railway_defect.evaluate", f"ckpt_path={ckpt}", f"hydra.run.dir={run}/evaluate_log")
    assert result.returncode == 0, result.stderr[-3000:]
    return ckpt


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_evaluate_reports_intervals_and_stores_a_threshold_reaching_the_recall(trained: Path) -> None:
    out = trained.parent.parent / "evaluation" / "best_val"
    report = json.loads((out / "evaluation.json").read_text())
    markdown = (out / "evaluation.md").read_text()
    assert (out / "reliability.png").stat().st_size > 1000
    assert report["data"]["split"] == "Validation"  # the sample data have no Test split
    assert report["data"]["n"] == 28
    for block in ("at_0.5", "at_threshold"):
        metrics = report["metrics"][block]
        for name in ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "auroc"):
            m = metrics[name]
            assert m["low"] <= m["value"] <= m["high"], (block, name)
        assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 28
    threshold = report["threshold"]
    assert threshold["target_recall"] == TARGET_RECALL
    assert threshold["validation"]["recall"]["value"] >= TARGET_RECALL
    assert report["metrics"]["at_threshold"]["threshold"] == threshold["value"]
    calibration = report["calibration"]
    assert calibration["temperature"] > 0 and 0 <= calibration["ece_after"] <= 1
    assert "## Operating threshold" in markdown and "## Calibration" in markdown

    stored = json.loads(calibration_path(trained).read_text())
    assert stored["threshold"] == pytest.approx(threshold["value"])
    assert stored["temperature"] == pytest.approx(calibration["temperature"])
    assert stored["model_sha256"] == file_sha256(trained)


def test_cli_predict_on_a_folder_of_images_a_corrupt_file_an_rgba_png_and_a_video(
    trained: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "inspection"
    folder.mkdir()
    for photo in sorted((VALIDATION / "Defective").iterdir())[:3]:
        shutil.copy(photo, folder / photo.name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    write_rgba(folder / "overlay" / "alpha.png")
    write_video(folder / "video" / "run.mp4", frames=25, fps=10.0)
    output, gradcams = tmp_path / "out" / "predictions.csv", tmp_path / "gradcam"

    result = run_cli(
        "railway_defect.predict",
        f"ckpt_path={trained}",
        f"input={folder}",
        f"output={output}",
        f"gradcam_dir={gradcams}",
        "tta=true",
        "batch_size=4",
        f"hydra.run.dir={tmp_path}/log",
    )
    assert result.returncode == 2, result.stderr[-3000:]  # one input could not be read
    rows = read_rows(output)
    stored = json.loads(calibration_path(trained).read_text())
    assert list(rows[0]) == [
        "path",
        "frame",
        "time_s",
        "p_Defective",
        "label",
        "threshold",
        "needs_review",
        "error",
        "model",
    ]
    assert len(rows) == 3 + 1 + 1 + 3  # photos, corrupt, alpha PNG, frames at 0, 1 and 2 s
    by_path = {}
    for row in rows:
        by_path.setdefault(Path(row["path"]).name, []).append(row)
    corrupt = by_path["corrupt.jpg"][0]
    assert corrupt["error"] and corrupt["p_Defective"] == "" and corrupt["label"] == ""
    frames = by_path["run.mp4"]
    assert [(r["frame"], r["time_s"]) for r in frames] == [("0", "0.0"), ("10", "1.0"), ("20", "2.0")]
    scored = [r for r in rows if not r["error"]]
    assert len(scored) == 7 and by_path["alpha.png"][0]["p_Defective"]
    for row in scored:
        p, threshold = float(row["p_Defective"]), float(row["threshold"])
        assert threshold == pytest.approx(stored["threshold"], abs=1e-6)
        assert row["label"] == ("Defective" if p >= threshold else "Non defective")
        assert row["needs_review"] in ("true", "false")
    assert {r["model"] for r in rows} == {file_sha256(trained)[:16]}
    positives = sum(r["label"] == "Defective" for r in rows)
    assert len(list(gradcams.glob("*.jpg"))) == positives > 0
    assert "1 unreadable" in result.stdout + result.stderr


def test_predict_with_the_stored_threshold_reaches_the_target_recall(trained: Path, tmp_path: Path) -> None:
    summary = run_prediction(str(trained), str(VALIDATION / "Defective"), tmp_path / "p.csv", progress=False)
    rows = read_rows(tmp_path / "p.csv")
    assert summary.failed == 0 and len(rows) == 19
    assert sum(r["label"] == "Defective" for r in rows) / len(rows) >= TARGET_RECALL
    # threshold=... overrides the stored one
    run_prediction(
        str(trained), str(VALIDATION / "Defective"), tmp_path / "q.csv", threshold=1.0, progress=False
    )
    assert {r["threshold"] for r in read_rows(tmp_path / "q.csv")} == {"1.0"}


def test_export_onnx_matches_pytorch_and_predict_accepts_it(trained: Path, tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    result = run_cli(
        "railway_defect.export",
        f"ckpt_path={trained}",
        "format=onnx",
        f"output={onnx_path}",
        f"hydra.run.dir={tmp_path}/log",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = load_predictor(trained, device="cpu")
    stored = json.loads(calibration_path(trained).read_text())

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    metadata = json.loads(session.get_modelmeta().custom_metadata_map["railway_defect"])
    assert metadata["class_names"] == ["Defective", "Non defective"]
    assert (
        metadata["input_size"] == 224
        and metadata["mean"] == [0.5, 0.5, 0.5]
        and metadata["cache_size"] == 256
    )
    assert metadata["threshold"] == pytest.approx(stored["threshold"])
    assert metadata["temperature"] == pytest.approx(stored["temperature"])

    photos = sorted((VALIDATION / "Non defective").iterdir())[:5]
    batch = reference.preprocess([decode_image(p.read_bytes(), 256) for p in photos])
    for size in (1, 5):  # the batch axis is dynamic
        (logits,) = session.run(None, {"images": batch[:size]})
        exported = np.exp(logits / metadata["temperature"])
        exported /= exported.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(exported, reference.probabilities(batch[:size]), atol=1e-4)

    run_prediction(str(trained), str(VALIDATION / "Non defective"), tmp_path / "ckpt.csv", progress=False)
    run_prediction(str(onnx_path), str(VALIDATION / "Non defective"), tmp_path / "onnx.csv", progress=False)
    from_ckpt, from_onnx = read_rows(tmp_path / "ckpt.csv"), read_rows(tmp_path / "onnx.csv")
    assert len(from_ckpt) == len(from_onnx) == 9
    for a, b in zip(from_ckpt, from_onnx, strict=True):
        assert float(a["p_Defective"]) == pytest.approx(float(b["p_Defective"]), abs=1e-4)
        assert a["label"] == b["label"] and a["threshold"] == b["threshold"]
    assert from_onnx[0]["model"] == file_sha256(onnx_path)[:16]


def test_export_torchscript_carries_its_metadata(trained: Path, tmp_path: Path) -> None:
    from railway_defect.inference.exporting import export_model

    result = export_model(str(trained), "torchscript", tmp_path / "model.pt")
    assert result["max_abs_diff"] <= 1e-4
    predictor = load_predictor(tmp_path / "model.pt")
    assert predictor.kind == "torchscript" and predictor.contract.class_names == (
        "Defective",
        "Non defective",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(trained: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "railway_defect.serve",
            f"ckpt_path={trained}",
            "host=127.0.0.1",
            f"port={port}",
            "max_upload_mb=0.05",
            f"hydra.run.dir={tmp_path}/log",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **OFFLINE_ENV},
        cwd=Path(__file__).resolve().parents[1],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, "the server exited while starting"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer within 180 s"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_serve_round_trip(trained: Path, server: str, tmp_path: Path) -> None:
    stored = json.loads(calibration_path(trained).read_text())
    health = httpx.get(f"{server}/health").json()
    assert health["model"] == file_sha256(trained)[:16]
    assert health["classes"] == ["Defective", "Non defective"]
    assert health["threshold"] == pytest.approx(stored["threshold"])

    small = sorted(p for p in VALIDATION.rglob("*.jp*g") if p.stat().st_size < 50_000)[:2]
    alpha = write_rgba(tmp_path / "alpha.png")
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in small]
    files.append(("files", ("alpha.png", alpha.read_bytes(), "image/png")))
    response = httpx.post(f"{server}/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert [r["path"] for r in rows] == [p.name for p in small] + ["alpha.png"]
    run_prediction(str(trained), str(small[0]), tmp_path / "one.csv", progress=False)
    (expected,) = read_rows(tmp_path / "one.csv")
    assert rows[0]["p_Defective"] == pytest.approx(float(expected["p_Defective"]), abs=1e-5)
    assert rows[0]["label"] == expected["label"] and rows[0]["model"] == health["model"]
    assert rows[0]["frame"] is None and rows[0]["error"] == "" and isinstance(rows[0]["needs_review"], bool)

    def refused(files: list, status: int) -> dict:
        response = httpx.post(f"{server}/predict", files=files, timeout=60)
        assert response.status_code == status, response.text
        return response.json()

    assert "empty" in refused([("files", ("empty.jpg", b"", "image/jpeg"))], 400)["error"]
    body = refused([("files", ("notes.txt", b"not an image", "text/plain"))], 415)
    assert body["files"][0]["file"] == "notes.txt"
    large = max(VALIDATION.rglob("*.jp*g"), key=lambda p: p.stat().st_size)
    assert "larger than" in refused([("files", (large.name, large.read_bytes(), "image/jpeg"))], 413)["error"]
    assert httpx.post(f"{server}/predict", data={"x": "1"}).status_code == 415
    assert httpx.post(f"{server}/predict", files={"other": ("a.txt", b"", "text/plain")}).status_code == 400

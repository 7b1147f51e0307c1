"""Shortcut audit: a property that predicts the label (image size, a source column) is flagged with a
warning and in data_report.json, TensorBoard and evaluate's report; data where nothing but the content
differs stay silent; only file headers are read; the sample data's thumbnail shortcut is found."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from railway_defect.data.audit import (
    SHORTCUT_THRESHOLD,
    audit_samples,
    jpeg_quality,
    read_properties,
    shortcut_warnings,
)
from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.data.discovery import Sample, discover
from tests.helpers import CLASSES, FAST, REAL_DATA, train_config, write_image

# sizes each class can have; in the shortcut set Defective photos are large originals, sound ones thumbnails
SIZES = [(48, 40), (40, 48), (56, 56)]


def make_dataset(root: Path, per_class: dict[str, int], size_by_class: bool) -> Path:
    """Split folders; .jpg and .png alternate in both classes, so only the size can give the label away."""
    seed = 0
    for split, count in per_class.items():
        for label_index, label in enumerate(CLASSES):
            for i in range(count):
                size = (64, 48) if size_by_class and label_index == 0 else SIZES[i % len(SIZES)]
                if size_by_class and label_index == 1:
                    size = (32, 32)
                suffix = ".png" if i % 2 else ".jpg"
                write_image(root / split / label / f"{split}_{i}{suffix}", size, label_index, seed=seed)
                seed += 1
    return root


def setup_report(root: Path, tmp_path: Path, caplog, **kwargs) -> tuple[dict, list[str]]:
    """(data_report.json, the shortcut warning lines) of a datamodule's setup."""
    report_path = tmp_path / "data_report.json"
    dm = RailwayDataModule.from_settings(
        root=root, image_size=32, cache_size=40, num_workers=0, report_path=report_path, **kwargs
    )
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return json.loads(report_path.read_text()), [w for w in warned if w.startswith("Shortcut")]


def test_image_size_that_predicts_the_label_is_flagged(tmp_path: Path, caplog) -> None:
    root = make_dataset(tmp_path / "data", {"Train": 8, "Validation": 4}, size_by_class=True)
    report, warned = setup_report(root, tmp_path, caplog)
    audit = report["shortcut_audit"]
    size = audit["properties"]["image_size"]
    assert size["balanced_accuracy"] >= SHORTCUT_THRESHOLD
    assert size["folds"] == 5 and size["n"] == 24
    assert {"image_size", "width", "height", "megapixels"} <= set(audit["flagged"])
    assert audit["all_properties"]["balanced_accuracy"] >= SHORTCUT_THRESHOLD
    line = next(w for w in warned if w.startswith("Shortcut: image size"))
    assert "alone predicts the label (cross-validated balanced accuracy 1.00 >= 0.70" in line
    assert "a model can learn how photos were stored instead of the track" in line
    assert "data.harmonize=thumbnail" in line and "experiment=cv" in line
    assert len(warned) == len(audit["flagged"])  # one line per property
    # the format alternates in both classes: not a shortcut
    assert "file_format" not in audit["flagged"]


def test_data_where_only_the_content_differs_stay_silent(tmp_path: Path, caplog) -> None:
    root = make_dataset(tmp_path / "data", {"Train": 8, "Validation": 4}, size_by_class=False)
    report, warned = setup_report(root, tmp_path, caplog)
    audit = report["shortcut_audit"]
    assert warned == [] and audit["flagged"] == []
    scores = {name: e["balanced_accuracy"] for name, e in audit["properties"].items()}
    assert max(scores.values()) < SHORTCUT_THRESHOLD, scores
    assert audit["all_properties"]["balanced_accuracy"] < SHORTCUT_THRESHOLD
    # bytes per pixel differs a little with the content (the dark bar compresses): not a shortcut
    assert scores["bytes_per_pixel"] < SHORTCUT_THRESHOLD


def test_audit_can_be_switched_off(tmp_path: Path, caplog) -> None:
    root = make_dataset(tmp_path / "data", {"Train": 4, "Validation": 2}, size_by_class=True)
    report, warned = setup_report(root, tmp_path, caplog, audit=False)
    assert report["shortcut_audit"] is None and warned == []


def test_tiny_data_use_fewer_folds_or_are_skipped_with_a_note(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", {"Train": 2, "Validation": 1}, size_by_class=True)
    samples = [s for split in discover(root, 0.2, 0).splits.values() for s in split]
    audit = audit_samples(samples, root)
    assert audit["folds"] == 3 and audit["properties"]["image_size"]["folds"] == 3
    one_each = [next(s for s in samples if s.label == c) for c in CLASSES]
    skipped = audit_samples(one_each, root)
    assert skipped["properties"] == {} and "skipped" in skipped["note"]
    assert shortcut_warnings(skipped) == [] and audit_samples([], root)["note"]


def test_a_manifest_source_column_that_predicts_the_label_is_flagged(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rows = ["path,label,split,group,source"]
    for i in range(24):
        label_index = i % 2
        name = f"img/{i}.jpg"
        write_image(root / name, SIZES[i % 3], label_index, seed=i)
        rows.append(f"{name},{CLASSES[label_index]},train,g{i},{'camera-a' if label_index else 'camera-b'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    samples = discover(root, 0.2, 0).splits
    audit = audit_samples([*samples["train"], *samples["val"]], root)
    assert audit["flagged"] == ["source"] and audit["source"] == "manifest.csv source column"
    assert "camera-" in audit["properties"]["source"]["contrast"]


def test_properties_come_from_the_header_without_decoding_pixels(tmp_path: Path, monkeypatch) -> None:
    jpg = write_image(tmp_path / "Defective" / "cam2" / "IMG_20240101_0042.jpg", (30, 20))
    png = write_image(tmp_path / "Defective" / "x.png", (8, 8), mode="L")

    def no_decoding(self):
        raise AssertionError("the audit decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    props = read_properties(jpg, "Defective", tmp_path)
    assert (props["width"], props["height"], props["file_format"], props["colour_mode"]) == (
        30,
        20,
        "JPEG",
        "RGB",
    )
    assert props["aspect_ratio"] == 1.5 and props["jpeg_quality"] == 75.0
    assert props["source"] == "cam2" and props["file_name_pattern"] == "IMG_#_#.jpg"
    assert props["bytes_per_pixel"] == jpg.stat().st_size / 600
    props = read_properties(png, "Defective", tmp_path)
    assert props["jpeg_quality"] is None and props["colour_mode"] == "L" and props["source"] == "."
    assert props["camera"] == "none"


@pytest.mark.parametrize("quality", [5, 40, 50, 75, 90, 95, 100])
def test_jpeg_quality_is_read_from_the_quantization_table(quality: int) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "gray").save(buffer, "JPEG", quality=quality)
    assert jpeg_quality(Image.open(buffer).quantization) == quality
    assert jpeg_quality(None) is None


def test_camera_make_and_model_are_read_from_exif(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "EOS 80D"
    path = tmp_path / "Defective" / "a.jpg"
    path.parent.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(path, exif=exif)
    assert read_properties(path, "Defective", tmp_path)["camera"] == "Canon EOS 80D"


def test_training_logs_the_audit_to_tensorboard_and_evaluate_repeats_it(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from railway_defect.evaluation.report import run_evaluation
    from railway_defect.training.run import run_training

    data = make_dataset(tmp_path / "data", {"Train": 6, "Validation": 5}, size_by_class=True)
    cfg = train_config(
        tmp_path / "run",
        *FAST,
        f"data.root={data}",
        "data.image_size=32",
        "data.cache_size=40",
        "trainer.max_epochs=1",
        "logger=tensorboard",
    )
    run_training(cfg)
    run = tmp_path / "run"
    assert "image_size" in json.loads((run / "data_report.json").read_text())["shortcut_audit"]["flagged"]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert "data/shortcut_audit/text_summary" in events.Tags()["tensors"]

    out = tmp_path / "evaluation"
    report = run_evaluation(
        str(run / "checkpoints" / "best.ckpt"),
        str(data),
        output_dir=str(out),
        bootstrap=10,
        store_calibration=False,
        device="cpu",
    )
    audit = report["shortcut_audit"]
    assert audit["n"] == 10 and "image_size" in audit["flagged"]
    assert json.loads((out / "evaluation.json").read_text())["shortcut_audit"]["flagged"] == audit["flagged"]
    assert "- shortcut audit: **shortcut**" in (out / "evaluation.md").read_text()


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="the shared sample data set is not beside the project")
def test_the_sample_data_thumbnail_shortcut_is_found() -> None:
    index = discover(REAL_DATA, 0.2, 42)
    samples: list[Sample] = [*index.splits["train"], *index.splits["val"]]
    audit = audit_samples(samples, REAL_DATA)
    assert audit["n"] == 107 and audit["folds"] == 5
    assert {"image_size", "width", "height", "source"} <= set(audit["flagged"])
    assert audit["source"] == "manifest.csv source column"
    assert (
        audit["properties"]["image_size"]["contrast"] == "224x224: Defective 24 of 76, Non defective 27 of 31"
    )
    assert audit["properties"]["colour_mode"]["balanced_accuracy"] < SHORTCUT_THRESHOLD
    assert any(w.startswith("Shortcut: image size") for w in shortcut_warnings(audit))
    # with the storage form harmonized, the advice is what is left to do, not to harmonize
    harmonized = shortcut_warnings(audit, "thumbnail")
    assert harmonized and all(
        "data.harmonize=thumbnail gives the model one storage form" in w for w in harmonized
    )
    assert not any("Use data.harmonize" in w for w in harmonized)

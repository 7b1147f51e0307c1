"""data.labels: reviewed labels (a triage store, a manifest, a Label Studio export) laid over the
photos of data.root, counted in data_report.json, and a run on them that is the run on the
equivalent manifest, exactly."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest
import torch

from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.data.discovery import check_nested_groups
from railway_defect.data.label_store import Item, LabelStore, file_digest, write_manifest
from railway_defect.data.labels import read_labels
from railway_defect.training.run import run_training
from railway_defect.utils.errors import UserError
from tests.helpers import CLASSES, FAST, make_split_dataset, write_image


def _triage_db(db: Path, photos: list[Path], labels: list[str]) -> LabelStore:
    """A triage store whose queue is `photos`, the first len(labels) of them labelled."""
    store = LabelStore(db)
    items = [Item(i, str(p.resolve()), None, None, file_digest(p), [0.5, 0.5]) for i, p in enumerate(photos)]
    meta = {"classes": list(CLASSES), "positive_class": "Defective", "model": "m", "order": "defect"}
    store.set_queue(meta, items)
    for item, label in zip(items, labels, strict=False):
        store.record(item, label, "ann", "m", {"probs": [0.5, 0.5], "predicted": "Defective"})
    return store


def _setup(root: Path, labels: Path | str, tmp_path: Path, **settings: object) -> RailwayDataModule:
    dm = RailwayDataModule.from_settings(
        root=root,
        labels=str(labels),
        image_size=32,
        cache_size=32,
        num_workers=0,
        report_path=tmp_path / "data_report.json",
        **settings,
    )
    dm.setup()
    return dm


def _labels_of(dm: RailwayDataModule) -> dict[str, tuple[str, str]]:
    """By the photo's folder and name (split datasets repeat names across class folders)."""
    return {
        f"{s.path.parent.name}/{s.path.name}": (split, s.label)
        for split, samples in dm.splits.items()
        for s in samples
    }


def _key(photo: Path) -> str:
    return f"{photo.parent.name}/{photo.name}"


def test_reviewed_labels_override_folder_labels_and_the_report_counts_them(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path / "data", {"Train": 4, "Validation": 2})
    defective = sorted((root / "Train" / "Defective").iterdir())
    sound = sorted((root / "Validation" / "Non defective").iterdir())
    db = tmp_path / "triage.sqlite"
    _triage_db(db, [defective[0], defective[1], sound[0]], ["Non defective", "Defective", "Defective"])

    dm = _setup(root, db, tmp_path)
    labels = _labels_of(dm)
    assert labels[_key(defective[0])] == ("train", "Non defective")  # overridden, split kept
    assert labels[_key(defective[1])] == ("train", "Defective")  # confirmed
    assert labels[_key(sound[0])] == ("val", "Defective")
    assert labels[_key(defective[2])] == ("train", "Defective")  # not reviewed: its folder's label
    report = json.loads((tmp_path / "data_report.json").read_text())["labels"]
    assert (report["kind"], report["reviewed"], report["overridden"], report["confirmed"]) == (
        "triage",
        3,
        2,
        1,
    )
    assert report["added"] == 0 and report["unreviewed"] == 9
    assert {(o["was"], o["now"]) for o in report["overrides"]} == {
        ("Defective", "Non defective"),
        ("Non defective", "Defective"),
    }


def test_new_photos_in_a_flat_folder_train_on_a_manifest_of_relative_paths(tmp_path: Path) -> None:
    """Crew photos without class folders: the manifest (paths relative to data.root) labels them,
    and the validation split is held out of them as of any photos."""
    photos = tmp_path / "new"
    for i in range(10):
        write_image(photos / f"p{i}.png", size=(24, 20), label_index=i % 2, seed=i)
    manifest = tmp_path / "reviewed.csv"
    manifest.write_text("path,label\n" + "".join(f"p{i}.png,{CLASSES[i % 2]}\n" for i in range(10)))

    dm = _setup(photos, manifest, tmp_path, val_fraction=0.4)
    labels = _labels_of(dm)
    assert len(labels) == 10 and {split for split, _ in labels.values()} == {"train", "val"}
    assert all(label == CLASSES[int(name.split("/")[1][1]) % 2] for name, (_, label) in labels.items())
    assert dm.index.labels["added"] == 10 and dm.index.labels["kind"] == "manifest"


def test_date_folders_are_not_classes_when_none_of_them_names_a_reviewed_class(tmp_path: Path) -> None:
    root = tmp_path / "crew"
    days = [
        write_image(root / day / f"{day}_{i}.png", size=(24, 20), label_index=i % 2, seed=i)
        for day in ("2026-11-30", "2026-12-01")
        for i in range(5)
    ]
    db = tmp_path / "triage.sqlite"
    reviewed = days[:8]
    _triage_db(db, days, [CLASSES[i % 2] for i in range(len(reviewed))])

    dm = _setup(root, db, tmp_path, val_fraction=0.4)
    assert {label for _, label in _labels_of(dm).values()} == set(CLASSES)
    assert len(_labels_of(dm)) == 8
    assert dm.index.labels["left_out_unlabelled"] == 2 and dm.index.labels["added"] == 8


def test_a_photo_changed_since_it_was_labelled_or_gone_is_left_out(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path / "data", {"Train": 3, "Validation": 2})
    photos = sorted((root / "Train" / "Defective").iterdir())
    elsewhere = [write_image(tmp_path / "new" / f"n{i}.png", seed=90 + i) for i in range(2)]
    db = tmp_path / "triage.sqlite"
    _triage_db(db, [photos[0], *elsewhere], ["Non defective", "Non defective", "Defective"])
    write_image(photos[0], seed=99)  # new pixels under the reviewed name
    elsewhere[1].unlink()

    dm = _setup(root, db, tmp_path)
    labels = _labels_of(dm)
    assert labels[_key(photos[0])] == ("train", "Defective")  # the folder's label, not the stale review
    assert labels["new/n0.png"] == ("train", "Non defective")  # a reviewed photo from elsewhere joins
    assert "new/n1.png" not in labels
    report = dm.index.labels
    # the deleted photo counts as changed on disk: its bytes are not those it was labelled on
    assert (report["changed_on_disk"], report["added"], report["overridden"]) == (2, 1, 0)


def test_a_label_studio_json_export_relabels_the_photos_it_names(tmp_path: Path) -> None:
    """Label Studio's "JSON" export: local-files URLs resolved against data.root, the latest
    annotation that was not cancelled."""
    root = make_split_dataset(tmp_path / "data", {"Train": 3, "Validation": 2})
    choice = [{"from_name": "label", "to_name": "image", "type": "choices"}]

    def annotation(label: str, updated: str, cancelled: bool = False) -> dict[str, object]:
        return {
            "id": len(updated),
            "result": [{**choice[0], "id": "r", "value": {"choices": [label]}}],
            "was_cancelled": cancelled,
            "created_at": "2026-12-01T10:00:00.000000Z",
            "updated_at": updated,
        }

    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/local-files/?d=Train/Defective/Train_0.jpg"},
            "annotations": [
                annotation("Non defective", "2026-12-01T10:05:00.000000Z"),
                annotation("Defective", "2026-12-01T10:01:00.000000Z"),
                annotation("Defective", "2026-12-01T10:09:00.000000Z", cancelled=True),
            ],
        }
    ]
    export = tmp_path / "project-1-at-2026-12-01.json"
    export.write_text(json.dumps(tasks))
    dm = _setup(root, export, tmp_path)
    assert _labels_of(dm)["Defective/Train_0.jpg"] == ("train", "Non defective")
    assert (dm.index.labels["kind"], dm.index.labels["overridden"]) == ("label_studio", 1)


def test_bad_label_files_are_one_line_errors_and_another_database_is_not_written(tmp_path: Path) -> None:
    conflicting = tmp_path / "twice.csv"
    conflicting.write_text("path,label\na.png,Defective\na.png,Non defective\n")
    with pytest.raises(UserError, match="one photo has one label"):
        read_labels(conflicting, tmp_path)
    with pytest.raises(UserError, match="is not a file"):
        read_labels(tmp_path / "missing.sqlite", tmp_path)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    before = other.read_bytes()
    with pytest.raises(UserError, match="not a railway_defect triage database"):
        read_labels(other, tmp_path)
    assert other.read_bytes() == before
    (tmp_path / "labels.txt").write_text("a.png Defective\n")
    with pytest.raises(UserError, match="not a triage database"):
        read_labels(tmp_path / "labels.txt", tmp_path)


def test_the_nested_plan_check_counts_the_reviewed_labels(tmp_path: Path) -> None:
    """Relabelling all sound photos but one Defective leaves too few of that class for the folds:
    the nested CV plan is refused before a job starts, as the jobs would see it."""
    root = make_split_dataset(tmp_path / "data", {"Train": 6})
    sound = sorted((root / "Train" / "Non defective").iterdir())
    db = tmp_path / "triage.sqlite"
    _triage_db(db, sound, ["Defective"] * (len(sound) - 1))
    check_nested_groups(root, 2, 2, 0, 10)  # the folders alone hold both classes
    with pytest.raises(UserError, match="Non defective: 1 groups"):
        check_nested_groups(root, 2, 2, 0, 10, labels=read_labels(db, root))


def _splits(run: Path) -> list[tuple[str, str, str, str, str]]:
    """splits.csv with each path resolved (one run's root holds the photos, the other's does not)."""
    with (run / "splits.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [(r["split"], r["path"].rsplit("/", 1)[-1], r["label"], r["group"], r["digest"]) for r in rows]


def test_training_on_the_triage_database_is_training_on_its_exported_manifest(
    compose_train, tmp_path: Path
) -> None:
    """The issue's goal: `train data.labels=<triage.sqlite>` = a run on the equivalent manifest,
    same splits and the same weights at the same seed."""
    photos = tmp_path / "new"
    files = [write_image(photos / f"p{i:02d}.png", label_index=i % 2, seed=i) for i in range(12)]
    db = tmp_path / "triage.sqlite"
    _triage_db(db, files, [CLASSES[i % 2] for i in range(12)])
    manifest_root = tmp_path / "manifest_root"
    manifest_root.mkdir()
    write_manifest(LabelStore(db), manifest_root / "manifest.csv")

    runs = {}
    for name, overrides in {
        "db": (f"data.root={photos}", f"data.labels={db}"),
        "manifest": (f"data.root={manifest_root}",),
    }.items():
        cfg = compose_train(*FAST, *overrides, "trainer.max_epochs=1")
        cfg.paths.output_dir = str(tmp_path / name)
        run_training(cfg)
        runs[name] = tmp_path / name
    assert _splits(runs["db"]) == _splits(runs["manifest"])
    weights = [
        torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        for run in runs.values()
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    report = json.loads((runs["db"] / "data_report.json").read_text())["labels"]
    assert report["added"] == 12 and report["source"] == str(db)

"""K-fold cross-validation: data.num_folds / data.fold give stratified folds that never split a
photo group, the K validation folds cover every image once, and (slow) experiment=cv runs every
fold on the real data and reports the mean ± std across folds."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.data.discovery import discover
from railway_defect.utils.errors import UserError
from tests.helpers import CLASSES, REAL_DATA, make_split_dataset, run_cli, write_image


def _folds(root: Path, k: int, seed: int = 0) -> list[dict[str, list]]:
    return [discover(root, seed=seed, num_folds=k, fold=i).splits for i in range(k)]


def test_folds_partition_the_pooled_train_and_validation_images(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path, {"Train": 9, "Validation": 3, "Test": 2})
    folds = _folds(root, 3)
    vals = [{s.path for s in fold["val"]} for fold in folds]
    pooled = {p for p in (root / "Train").rglob("*.*")} | {p for p in (root / "Validation").rglob("*.*")}
    assert set().union(*vals) == pooled
    assert sum(len(v) for v in vals) == len(pooled) == 24
    for fold, val in zip(folds, vals, strict=True):
        assert {s.path for s in fold["train"]} == pooled - val
        # stratified: each validation fold holds 4 of each class's 12 images
        assert Counter(s.label for s in fold["val"]) == {c: 4 for c in CLASSES}
        # the test split is left alone
        assert {s.path.parent.parent.name for s in fold["test"]} == {"Test"}


def test_manifest_groups_never_straddle_folds(tmp_path: Path) -> None:
    rows = ["path,label,group"]
    for i in range(30):
        write_image(tmp_path / f"{i}.png", label_index=i % 2, seed=i)
        rows.append(f"{i}.png,{CLASSES[i % 2]},site{i // 3}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    for fold in _folds(tmp_path, 4, seed=3):
        train_groups = {s.group for s in fold["train"]}
        val_groups = {s.group for s in fold["val"]}
        assert val_groups and train_groups.isdisjoint(val_groups)


def test_timestamp_bursts_stay_together_even_across_the_given_splits(tmp_path: Path) -> None:
    """A burst cut by the Train/Validation folders is one group once the splits are pooled."""
    for label_index, label in enumerate(CLASSES):
        for i in range(10):
            write_image(tmp_path / "Train" / label / f"p{i}.jpg", label_index=label_index, seed=i)
        hour = 14 + label_index  # two photos 3 s apart, one in each split
        write_image(tmp_path / "Train" / label / f"IMG_20230102_{hour}0000.jpg", label_index=label_index)
        write_image(tmp_path / "Validation" / label / f"IMG_20230102_{hour}0003.jpg", label_index=label_index)
    for seed in range(3):
        for fold in _folds(tmp_path, 3, seed=seed):
            for label in CLASSES:
                burst = {
                    split
                    for split in ("train", "val")
                    for s in fold[split]
                    if s.label == label and "IMG_" in s.path.name
                }
                assert len(burst) == 1, burst


def test_fold_mistakes_are_clear_errors(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path, {"Train": 3, "Validation": 1})
    with pytest.raises(UserError, match="data.fold must be between 0 and 2"):
        discover(root, num_folds=3, fold=3)
    with pytest.raises(UserError, match="data.num_folds must be 2 or more"):
        discover(root, num_folds=1)
    with pytest.raises(UserError, match="needs data.num_folds"):
        discover(root, fold=1)
    with pytest.raises(UserError, match="Only 8 independent photo groups for 10 folds"):
        discover(root, num_folds=10)


def test_datamodule_reports_the_fold(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path / "data", {"Train": 6, "Validation": 3})
    report = tmp_path / "report.json"
    dm = RailwayDataModule.from_settings(
        root=root, image_size=32, cache_size=40, num_workers=0, num_folds=3, fold=1, report_path=report
    )
    dm.setup("fit")
    written = json.loads(report.read_text())
    assert written["folds"] == {"num_folds": 3, "fold": 1}
    assert written["counts"]["val"] == {"Defective": 3, "Non defective": 3}


def test_split_seed_keeps_the_folds_while_the_training_seed_changes(tmp_path: Path) -> None:
    """data.split_seed fixed, seed varied: the same folds (models of several seeds trained on the same
    photos); without it the seed picks the folds too."""
    root = make_split_dataset(tmp_path, {"Train": 12, "Validation": 4})

    def val_paths(**kwargs: int) -> set[Path]:
        dm = RailwayDataModule.from_settings(
            root=root, image_size=32, cache_size=40, num_workers=0, num_folds=4, fold=0, **kwargs
        )
        dm.setup("fit")
        assert dm.seed == kwargs["seed"]  # batch order and augmentation follow the training seed
        return {s.path for s in dm.splits["val"]}

    assert val_paths(seed=1, split_seed=7) == val_paths(seed=2, split_seed=7) == val_paths(seed=7)
    assert val_paths(seed=1) != val_paths(seed=2)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="the shared sample data set is not beside the project")
def test_experiment_cv_runs_every_fold_on_the_real_data(tmp_path: Path) -> None:
    sweep = tmp_path / "cv"
    result = run_cli(
        "railway_defect.train",
        "experiment=cv",
        "data.num_folds=3",
        "debug=limit",
        "trainer.max_epochs=1",
        "model=resnet18",
        "model.pretrained=false",
        "data.image_size=32",
        "data.cache_size=40",
        "trainer.accelerator=cpu",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((sweep / str(i) / "data_report.json").read_text()) for i in range(3)]
    assert [r["folds"] for r in reports] == [{"num_folds": 3, "fold": i} for i in range(3)]
    # the 107 sample images: every one is validated in exactly one fold
    assert sum(sum(r["counts"]["val"].values()) for r in reports) == 107
    assert all(sum(r["counts"]["train"].values()) + sum(r["counts"]["val"].values()) == 107 for r in reports)

    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["job"] for r in rows) == ["0", "1", "2"]
    assert {r["status"] for r in rows} == {"ok"}
    with (sweep / "summary_groups.csv").open() as f:
        (group,) = list(csv.DictReader(f))
    assert (group["over"], group["ok"], group["jobs"]) == ("folds", "3", "3")
    ba = [float(r["val/balanced_acc_best"]) for r in rows]
    assert float(group["val/balanced_acc_best_mean"]) == pytest.approx(sum(ba) / 3, abs=1e-4)
    assert "Mean ± std per configuration" in (sweep / "summary.md").read_text()
    assert "Mean ± std per configuration" in result.stdout

    # out-of-fold: every image once, scored by the fold that validated it, pooled with intervals
    with (sweep / "oof_predictions.csv").open() as f:
        oof_rows = list(csv.DictReader(f))
    assert len(oof_rows) == 107 and len({r["path"] for r in oof_rows}) == 107
    fold_of = {
        row["path"]: i
        for i in range(3)
        for row in csv.DictReader((sweep / str(i) / "predictions_val.csv").open())
    }
    assert len(fold_of) == 107
    (pooled,) = json.loads((sweep / "oof.json").read_text())
    overall = pooled["metrics"]["all@0.5"]
    assert overall["n"] == 107
    assert overall["balanced_accuracy"]["low"] <= overall["balanced_accuracy"]["value"]
    assert {"all@0.5", "224x224@0.5", "other sizes@0.5"} <= set(pooled["metrics"])
    assert pooled["worst_stratum"] in ("224x224", "other sizes")
    assert "Out-of-fold estimates" in (sweep / "summary.md").read_text()

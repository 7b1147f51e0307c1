"""Finding samples and splits in every supported layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from railway_defect.data.discovery import discover, infer_groups
from railway_defect.utils.errors import UserError
from tests.helpers import CLASSES, make_split_dataset, write_image


def test_split_folders_in_any_case_and_alias(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path, {"train": 3, "VALID": 2, "Test": 1})
    index = discover(root)
    assert index.layout == "split_folders"
    assert index.classes == sorted(CLASSES)
    assert index.counts() == {
        "train": {"Defective": 3, "Non defective": 3},
        "val": {"Defective": 2, "Non defective": 2},
        "test": {"Defective": 1, "Non defective": 1},
    }


def test_two_folders_for_one_split_is_an_error(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path, {"Train": 2, "val": 1, "Validation": 1})
    with pytest.raises(UserError, match="two folders for the val split"):
        discover(root)


def test_class_folders_are_split_stratified(tmp_path: Path) -> None:
    for label_index, label in enumerate(("a", "b", "c")):
        for i in range(10):
            write_image(tmp_path / label / f"{i}.png", label_index=label_index, seed=i)
    index = discover(tmp_path, val_fraction=0.2, seed=1)
    assert index.layout == "class_folders"
    assert index.classes == ["a", "b", "c"]
    assert index.counts()["val"] == {"a": 2, "b": 2, "c": 2}
    train = {s.path for s in index.splits["train"]}
    assert train.isdisjoint(s.path for s in index.splits["val"])
    assert len(train) == 24


def test_manifest_with_groups_keeps_each_group_in_one_split(tmp_path: Path) -> None:
    rows = ["path,label,group"]
    for i in range(20):
        label = CLASSES[i % 2]
        write_image(tmp_path / "img" / f"{i}.png", label_index=i % 2, seed=i)
        rows.append(f"img/{i}.png,{label},g{i // 4}")
    rows.append("img/missing.png,Defective,g9")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    index = discover(tmp_path, val_fraction=0.25, seed=0)
    assert index.layout == "manifest"
    split_of_group: dict[str, set[str]] = {}
    for split, samples in index.splits.items():
        for s in samples:
            split_of_group.setdefault(s.group, set()).add(split)
    assert all(len(splits) == 1 for splits in split_of_group.values())
    assert {"train", "val"} == set(index.splits)
    assert any("missing.png" in item["path"] and "not found" in item["reason"] for item in index.ignored)


def test_manifest_split_column_is_used(tmp_path: Path) -> None:
    rows = ["path,label,split"]
    for i, split in enumerate(
        ["Train", "Train", "Train", "Train", "Validation", "validation", "test", "TEST"]
    ):
        write_image(tmp_path / f"{i}.jpg", label_index=i % 2, seed=i)
        rows.append(f"{i}.jpg,{CLASSES[i % 2]},{split}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    index = discover(tmp_path)
    assert {k: len(v) for k, v in index.splits.items()} == {"train": 4, "val": 2, "test": 2}


def test_hidden_and_non_image_files_are_left_out(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path, {"Train": 2, "Validation": 1})
    (root / "Train" / "Defective" / ".DS_Store").write_bytes(b"junk")
    (root / "Train" / "Defective" / "notes.txt").write_text("hello")
    write_image(root / "__MACOSX" / "Defective" / "x.png")
    write_image(root / "Train" / ".hidden" / "x.png")
    index = discover(root)
    assert index.counts()["train"] == {"Defective": 2, "Non defective": 2}
    assert [Path(i["path"]).name for i in index.ignored] == ["notes.txt"]


def test_empty_root_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="No images found"):
        discover(tmp_path)


def test_burst_photos_share_a_group_by_file_name_timestamp() -> None:
    paths = [
        Path(n)
        for n in ("IMG_20201114_100226.jpg", "IMG_20201114_100231.jpg", "IMG_20201114_101835.jpg", "x.jpg")
    ]
    groups = infer_groups(paths)
    assert groups[0] == groups[1]
    assert len({groups[0], groups[2], groups[3]}) == 3


def test_large_data_sets_get_fast_stratified_group_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above FAST_FOLDS_ABOVE groups, folds come from an O(n log k) assignment: every image in
    exactly one fold, whole groups only, each fold's class mix close to the whole."""
    from railway_defect.data import discovery

    monkeypatch.setattr(discovery, "FAST_FOLDS_ABOVE", 0)
    labels = ["a" if i % 10 < 7 else "b" for i in range(1000)]
    groups = [f"g{i // 4}" if i < 200 else f"s{i}" for i in range(1000)]
    folds = discovery._group_folds(labels, groups, 5, seed=3)
    tests = np.concatenate([test for _, test in folds])
    assert sorted(tests.tolist()) == list(range(1000))
    for train, test in folds:
        assert not {groups[i] for i in train} & {groups[i] for i in test}
        share = sum(labels[i] == "a" for i in test) / len(test)
        assert 0.65 <= share <= 0.75 and 190 <= len(test) <= 210
    assert [t.tolist() for _, t in folds] == [
        t.tolist() for _, t in discovery._group_folds(labels, groups, 5, 3)
    ]

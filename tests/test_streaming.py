"""data.storage: auto keeps small data sets in memory and streams when memory is short; stream mode
builds each split once into LitData chunks (reused while the images and decode settings stay the
same, rebuilt when they change), serves the same pixels as memory mode, and trains end to end."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch

from railway_defect.data import storage as storage_choice
from railway_defect.data import streaming
from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.data.discovery import Sample, discover
from railway_defect.data.table import SampleTable, label_codes, label_counts
from railway_defect.models.module import DefectClassifier
from railway_defect.training.run import run_training
from railway_defect.utils import resources
from tests.helpers import FAST, REAL_DATA


def datamodule(root: Path, **kwargs) -> RailwayDataModule:
    defaults = {"image_size": 32, "cache_size": 40, "batch_size": 4, "num_workers": 0}
    return RailwayDataModule.from_settings(root=root, **{**defaults, **kwargs})


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="sample data not available")
def test_auto_keeps_the_sample_data_in_memory() -> None:
    paths = [s.path for samples in discover(REAL_DATA).splits.values() for s in samples]
    assert storage_choice.choose_storage("auto", paths, 256, "none") == "memory"


def test_auto_streams_when_the_memory_limit_is_small(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_choice, "available_memory", lambda: 10_000)  # bytes: far below 22 images
    dm = datamodule(tiny_dataset, stream_dir=tmp_path / "stream")
    dm.setup("fit")
    assert dm.storage_used == "stream" and dm.report["storage"] == "stream"
    assert dm.decoded is not None and not dm.decoded.images  # nothing decoded into memory
    monkeypatch.setattr(storage_choice, "available_memory", lambda: 8 * 2**30)
    assert datamodule(tiny_dataset, stream_dir=tmp_path / "s2").storage == "auto"
    roomy = datamodule(tiny_dataset, stream_dir=tmp_path / "s2")
    roomy.setup("fit")
    assert roomy.storage_used == "memory"


def test_cgroup_v2_limit_caps_the_available_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "meminfo").write_text("MemTotal: 100000000 kB\nMemAvailable: 90000000 kB\n")
    (tmp_path / "cgroup").write_text("0::/job\n")
    job = tmp_path / "fs" / "job"
    job.mkdir(parents=True)
    (job / "memory.max").write_text(f"{4 * 2**30}\n")
    (job / "memory.current").write_text(f"{1 * 2**30}\n")
    monkeypatch.setattr(resources, "PROC_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(resources, "PROC_SELF_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(resources, "CGROUP_ROOT", tmp_path / "fs")
    assert resources.available_memory() == 3 * 2**30
    (job / "memory.max").write_text("max\n")
    assert resources.available_memory() == 90000000 * 1024


def test_cgroup_v1_limit_caps_the_available_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "meminfo").write_text("MemAvailable: 90000000 kB\n")
    (tmp_path / "cgroup").write_text("4:memory:/job\n1:cpu:/\n")
    job = tmp_path / "fs" / "memory" / "job"
    job.mkdir(parents=True)
    (job / "memory.limit_in_bytes").write_text(f"{2 * 2**30}\n")
    (job / "memory.usage_in_bytes").write_text(f"{2**29}\n")
    monkeypatch.setattr(resources, "PROC_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(resources, "PROC_SELF_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(resources, "CGROUP_ROOT", tmp_path / "fs")
    assert resources.available_memory() == 2 * 2**30 - 2**29


def test_stream_serves_the_pixels_of_memory_mode_and_skips_bad_files(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    (tiny_dataset / "Train" / "Defective" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    streamed = datamodule(tiny_dataset, storage="stream", stream_dir=tmp_path / "stream")
    streamed.setup("fit")
    memory = datamodule(tiny_dataset, storage="memory")
    memory.setup("fit")
    assert streamed.splits == memory.splits
    assert [Path(s["path"]).name for s in streamed.report["skipped"]] == ["corrupt.jpg"]
    for split in ("val", "test"):
        a = [batch for batch in getattr(streamed, f"{split}_dataloader")()]
        b = [batch for batch in getattr(memory, f"{split}_dataloader")()]
        assert torch.equal(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b]))
        assert torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in b]))
    # training: every readable image once per epoch, in LitData's order (different each epoch)
    epochs = [torch.cat([y for _, y in streamed.train_dataloader()]) for _ in range(2)]
    for targets in epochs:
        assert sorted(targets.tolist()) == sorted(memory._dataset("train", memory.eval_transform).targets)


def test_optimized_folder_is_reused_and_rebuilt_when_cache_size_changes(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    builds = []
    real_optimize = streaming.optimize
    monkeypatch.setattr(
        streaming, "optimize", lambda **kw: builds.append(kw["output_dir"]) or real_optimize(**kw)
    )
    stream_dir = tmp_path / "stream"
    first = datamodule(tiny_dataset, storage="stream", stream_dir=stream_dir)
    first.setup("fit")
    assert len(builds) == 3  # train, val, test
    with caplog.at_level(logging.INFO):
        again = datamodule(tiny_dataset, storage="stream", stream_dir=stream_dir)
        again.setup("fit")
    assert len(builds) == 3 and again.streams == first.streams
    assert sum("Reusing the optimized data" in r.getMessage() for r in caplog.records) == 3
    meta = json.loads((Path(first.streams["train"][0]) / streaming.META_NAME).read_text())
    assert meta["count"] == 12 and meta["failures"] == {}

    larger = datamodule(tiny_dataset, storage="stream", stream_dir=stream_dir, cache_size=48)
    larger.setup("fit")
    assert len(builds) == 6
    assert {loc for loc, _ in larger.streams.values()}.isdisjoint(loc for loc, _ in first.streams.values())
    # one changed validation image: only the validation split is rebuilt
    changed = next((tiny_dataset / "Validation" / "Defective").iterdir())
    changed.write_bytes(changed.read_bytes() + b"\0")
    edited = datamodule(tiny_dataset, storage="stream", stream_dir=stream_dir)
    edited.setup("fit")
    assert len(builds) == 7 and edited.streams["train"] == first.streams["train"]
    assert edited.streams["val"][0] != first.streams["val"][0]


def test_a_build_keeps_litdata_working_folders_to_itself(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LitData empties <temp>/chunks and <temp>/data before every build: two builds at once (or a
    user's own optimize) would clear each other's. Each build works in its own folders, removed
    after it, and the temp dir is left as it was."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    for name in streaming.OPTIMIZER_FOLDERS:
        monkeypatch.delenv(name, raising=False)
    seen = []
    real_optimize = streaming.optimize

    def optimize(**kw: object) -> None:
        seen.append({name: os.environ[name] for name in streaming.OPTIMIZER_FOLDERS})
        real_optimize(**kw)

    monkeypatch.setattr(streaming, "optimize", optimize)
    datamodule(tiny_dataset, storage="stream", stream_dir=tmp_path / "stream").setup("fit")
    assert len(seen) == 3 and len({folders["DATA_OPTIMIZER_CACHE_FOLDER"] for folders in seen}) == 3
    assert all(Path(folder).is_relative_to(temp) for folders in seen for folder in folders.values())
    assert list(temp.iterdir()) == []
    assert not any(name in os.environ for name in streaming.OPTIMIZER_FOLDERS)


def test_stream_mode_trains_and_its_checkpoint_predicts_like_memory_mode(
    compose_train, tiny_dataset: Path, tmp_path: Path
) -> None:
    cfg = compose_train(
        *FAST, f"data.root={tiny_dataset}", "data.storage=stream", f"data.stream_dir={tmp_path / 'stream'}"
    )
    run_training(cfg)
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["history"]) == 2
    assert json.loads((run_dir / "data_report.json").read_text())["storage"] == "stream"
    # validated from decoded images in memory, the checkpoint scores what it scored while streaming
    model = DefectClassifier.load_from_checkpoint(metrics["checkpoints"]["best"], pretrained=False)
    dm = RailwayDataModule.from_settings(
        root=tiny_dataset, image_size=64, cache_size=72, batch_size=4, num_workers=0, storage="memory"
    )
    (validated,) = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(model, dm)
    assert validated["val/f1"] == pytest.approx(metrics["val"]["val/f1"], abs=1e-6)
    assert validated["val/loss"] == pytest.approx(metrics["val"]["val/loss"], abs=1e-5)


def test_balanced_sampling_reads_the_chunks_by_position(tiny_dataset: Path, tmp_path: Path) -> None:
    dm = datamodule(tiny_dataset, storage="stream", stream_dir=tmp_path / "stream", balance="sampler")
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert type(loader).__name__ == "DataLoader"
    assert sum(len(y) for _, y in loader) == 12


def test_data_report_lists_counts_and_the_first_problems(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from railway_defect.data import datamodule as datamodule_module

    monkeypatch.setattr(datamodule_module, "REPORT_LIMIT", 2)
    for i in range(5):
        (tiny_dataset / "Train" / "Defective" / f"bad{i}.jpg").write_bytes(b"not an image")
        (tiny_dataset / "Train" / "Defective" / f"notes{i}.txt").write_text("x")
    dm = datamodule(tiny_dataset, storage="memory", audit=False)
    dm.setup("fit")
    assert dm.report["skipped_count"] == 5 and len(dm.report["skipped"]) == 2
    assert dm.report["ignored_count"] == 5 and len(dm.report["ignored"]) == 2
    assert dm.report["ignored_reasons"] == {"not an image file extension": 5}


def test_stream_mode_writes_the_splits_csv_and_report_of_memory_mode(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """Samples held as compact columns in stream mode change nothing that is written: splits.csv and
    data_report.json (leakage across splits and skipped files included) match memory mode's."""
    first = sorted((tiny_dataset / "Train" / "Defective").iterdir())[0]
    (tiny_dataset / "Validation" / "Defective" / "copy.jpg").write_bytes(first.read_bytes())
    (tiny_dataset / "Train" / "Defective" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    written = {}
    for storage in ("memory", "stream"):
        out = tmp_path / storage
        dm = datamodule(
            tiny_dataset,
            storage=storage,
            stream_dir=tmp_path / "stream",
            splits_path=out / "splits.csv",
            report_path=out / "data_report.json",
        )
        dm.setup("fit")
        report = json.loads((out / "data_report.json").read_text())
        assert report.pop("storage") == storage
        report["shortcut_audit"].pop("seconds")
        written[storage] = ((out / "splits.csv").read_text(), report)
    assert written["stream"] == written["memory"]
    assert written["stream"][1]["duplicates_across_splits_count"] == 1


def test_a_sample_table_gives_back_the_samples_it_was_built_from() -> None:
    samples = [
        Sample(Path("/data/caf\udce9/1.jpg"), "Defective", "/data/caf\udce9/1.jpg"),  # not UTF-8
        Sample(Path("/data/2.jpg"), "Non defective", "burst 7"),
        Sample(Path("/data/3.jpg"), "Defective", "burst 7"),
    ]
    table = SampleTable.from_samples(samples, ["Defective", "Non defective"])
    assert list(table) == samples and table == samples and table[-1] == samples[-1]
    assert table.take([2, 0]) == [samples[2], samples[0]]
    assert label_counts(table) == {"Defective": 2, "Non defective": 1}
    assert label_codes(table, ["Defective", "Non defective"]).tolist() == [0, 1, 0]

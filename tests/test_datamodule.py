"""RailwayDataModule: bad files are skipped and reported, splits are checked, batches have the
right shape and normalisation, decoding happens once, balancing works, data.url downloads."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from railway_defect.data import images
from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.utils.errors import UserError
from tests.helpers import make_split_dataset, write_image


def datamodule(root: Path, **kwargs) -> RailwayDataModule:
    defaults = {"image_size": 32, "cache_size": 40, "batch_size": 4, "num_workers": 0}
    return RailwayDataModule.from_settings(root=root, **{**defaults, **kwargs})


def test_bad_files_are_skipped_with_a_warning_and_reported(
    tiny_dataset: Path, tmp_path: Path, caplog
) -> None:
    (tiny_dataset / "Train" / "Defective" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tiny_dataset / "Train" / "Defective" / "empty.png").write_bytes(b"")
    (tiny_dataset / "Train" / "Non defective" / "text.jpg").write_text("hello")
    report_path = tmp_path / "report.json"
    dm = datamodule(tiny_dataset, report_path=report_path)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("corrupt.jpg", "empty.png", "text.jpg"):
        assert sum(name in w for w in warned) == 1
    report = json.loads(report_path.read_text())
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["corrupt.jpg", "empty.png", "text.jpg"]
    assert report["counts"]["train"] == {"Defective": 6, "Non defective": 6}
    assert report["classes"] == ["Defective", "Non defective"]


def test_batches_are_normalised_tensors_of_the_input_size(tiny_dataset: Path) -> None:
    dm = datamodule(tiny_dataset, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dm.setup("fit")
    images_, targets = next(iter(dm.val_dataloader()))
    assert images_.shape == (4, 3, 32, 32) and images_.dtype == torch.float32
    assert images_.min() >= -1.0 and images_.max() <= 1.0
    assert set(targets.tolist()) <= {0, 1}
    assert dm.has_split("test") and len(dm.test_dataloader().dataset) == 4


def test_images_are_decoded_once_then_served_from_the_cache(tiny_dataset: Path, monkeypatch) -> None:
    calls = Counter()
    real_decode = images.decode_image

    def counting_decode(*args, **kwargs):
        calls["decode"] += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(images, "decode_image", counting_decode)
    dm = datamodule(tiny_dataset)
    dm.setup("fit")
    assert calls["decode"] == 22
    for _ in range(2):  # two epochs
        for _batch in dm.train_dataloader():
            pass
    assert calls["decode"] == 22


@pytest.mark.parametrize("choice", ["none", "light", "strong", "nuisance"])
def test_augmentation_choices_augment_training_images_only(
    compose_train, tiny_dataset: Path, choice: str
) -> None:
    """Drawn twice, a training image differs under every augmentation choice but `none`, while a
    validation image never does; a wide photo still comes out as the model's square input."""
    cfg = compose_train(f"augmentation={choice}", "data.image_size=48", "data.cache_size=56")
    write_image(tiny_dataset / "Train" / "Defective" / "wide.png", size=(200, 40))
    dm = datamodule(
        tiny_dataset, image_size=48, cache_size=56, train_transforms=instantiate(cfg.augmentation.transforms)
    )
    dm.setup("fit")
    train, val = dm._dataset("train", dm.train_transform), dm._dataset("val", dm.eval_transform)
    first, second = ([train[i][0] for i in range(len(train))] for _ in range(2))
    assert all(image.shape == (3, 48, 48) for image in first)
    changed = sum(not torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert changed == 0 if choice == "none" else changed > len(first) // 2
    assert all(torch.equal(val[i][0], val[i][0]) for i in range(len(val)))


def test_a_train_split_with_one_class_is_a_clear_error(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 3, "Validation": 2})
    shutil.rmtree(root / "Train" / "Non defective")
    with pytest.raises(UserError, match="only the class 'Defective'"):
        datamodule(root).setup("fit")


def test_a_split_with_only_unreadable_images_is_a_clear_error(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 3})
    for label in ("Defective", "Non defective"):
        (root / "Validation" / label).mkdir(parents=True)
        (root / "Validation" / label / "bad.jpg").write_text("not an image")
    with pytest.raises(UserError, match="val split .* has no readable images"):
        datamodule(root).setup("fit")


def test_unknown_positive_class_is_a_clear_error(tiny_dataset: Path) -> None:
    with pytest.raises(UserError, match="data.positive_class='Broken'"):
        datamodule(tiny_dataset, positive_class="Broken").setup("fit")


def test_missing_root_says_where_it_looked_and_how_to_set_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"does not exist .*RAILWAY_DATA_DIR"):
        datamodule(tmp_path / "nowhere").prepare_data()


def test_more_than_two_classes_work(tmp_path: Path) -> None:
    root = make_split_dataset(
        tmp_path / "d", {"Train": 3, "Validation": 1}, classes=("Crack", "Defective", "Ok")
    )
    dm = datamodule(root)
    dm.setup("fit")
    assert dm.classes == ["Crack", "Defective", "Ok"]


def test_balance_sampler_draws_classes_evenly(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 2, "Validation": 1})
    for i in range(2, 18):  # 18 Defective vs 2 Non defective
        write_image(root / "Train" / "Defective" / f"extra_{i}.png", seed=100 + i)
    dm = datamodule(root, balance="sampler")
    dm.setup("fit")
    drawn = Counter()
    for _ in range(20):
        for _, targets in dm.train_dataloader():
            drawn.update(targets.tolist())
    assert 0.4 < drawn[1] / sum(drawn.values()) < 0.6


def test_balance_stratum_draws_every_class_and_image_size_evenly(tmp_path: Path) -> None:
    """The sample data's trap in small: most Defective photos are large originals, most Non
    defective ones thumbnails; balance=stratum draws each (class, size) cell equally often."""
    train = tmp_path / "d" / "Train"
    cells = {("Defective", (96, 72)): 12, ("Defective", (48, 48)): 3, ("Non defective", (48, 48)): 9}
    cells[("Non defective", (96, 72))] = 2
    for (label, size), count in cells.items():
        for i in range(count):
            write_image(
                train / label / f"{size[0]}_{i}.png", size=size, label_index=label != "Defective", seed=i
            )
    for label in ("Defective", "Non defective"):
        write_image(tmp_path / "d" / "Validation" / label / "v.png", label_index=label != "Defective")
    dm = datamodule(tmp_path / "d", balance="stratum")
    dm.setup("fit")
    weights = dm._sampling_weights(dm.train_dataloader().dataset.targets)
    totals = Counter()
    for sample, weight in zip(dm.splits["train"], weights.tolist(), strict=True):
        totals[(sample.label, sample.path.name.split("_")[0])] += weight
    assert sorted(totals) == [
        ("Defective", "48"),
        ("Defective", "96"),
        ("Non defective", "48"),
        ("Non defective", "96"),
    ]
    assert all(total == pytest.approx(1.0) for total in totals.values())


def test_balance_loss_gives_inverse_frequency_weights(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 2, "Validation": 1})
    for i in range(4):
        write_image(root / "Train" / "Defective" / f"extra_{i}.png", seed=100 + i)
    dm = datamodule(root, balance="loss")
    dm.setup("fit")
    assert dm.class_weights == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    assert datamodule(root).class_weights is None


def test_a_typo_in_balance_is_a_clear_error(tiny_dataset: Path) -> None:
    with pytest.raises(UserError, match="data.balance='sampel'"):
        datamodule(tiny_dataset, balance="sampel")


def _serve(directory: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_data_url_downloads_and_extracts_a_zip(tmp_path: Path) -> None:
    source = make_split_dataset(tmp_path / "src" / "railway", {"Train": 3, "Validation": 1})
    archive = shutil.make_archive(
        str(tmp_path / "www" / "railway"), "zip", root_dir=source.parent, base_dir="railway"
    )
    sha256 = hashlib.sha256(Path(archive).read_bytes()).hexdigest()
    server = _serve(tmp_path / "www")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/railway.zip"
        with pytest.raises(UserError, match="SHA-256"):
            datamodule(tmp_path / "bad", url=url, sha256="0" * 64).prepare_data()
        assert not (tmp_path / "bad").exists()
        dm = datamodule(tmp_path / "downloaded", url=url, sha256=sha256)
        dm.prepare_data()
        dm.setup("fit")
    finally:
        server.shutdown()
    assert (tmp_path / "downloaded" / "Train" / "Defective").is_dir()
    assert dm.report["counts"]["train"] == {"Defective": 3, "Non defective": 3}


def test_archive_is_hashed_in_chunks_not_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data set's zip can be larger than the memory: its SHA-256 is computed chunk by chunk."""
    from railway_defect.data import download

    source = make_split_dataset(tmp_path / "src" / "railway", {"Train": 2})
    archive = Path(shutil.make_archive(str(tmp_path / "railway"), "zip", root_dir=source.parent))
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(download, "CHUNK_BYTES", 1000)
    reads: list[int] = []
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        reads.append(1)
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    download.download_and_extract(archive.as_uri(), tmp_path / "downloaded", sha256=sha256)
    assert not reads
    assert (tmp_path / "downloaded" / "Train" / "Defective").is_dir()
    assert download.archive_sha256(archive) == sha256 and archive.stat().st_size > 1000

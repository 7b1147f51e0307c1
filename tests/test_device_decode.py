"""data.decode: `auto` picks the device path only on CUDA, for large sets and augmentations it can
run; the device path (here on the CPU: the same torch ops, the stand-in for a GPU) gives the model
the images of the CPU path to a stated tolerance, draws the same random parameters for the same
(seed, epoch, image), and trains a checkpoint that scores like one trained on the CPU path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from railway_defect.data import device, storage
from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.data.device import (
    DeviceItems,
    DevicePlan,
    EncodedBatch,
    EncodedImage,
    UnsupportedOnDevice,
    _downscaled,
    _recompressed,
    collate_encoded,
    decode_on,
    encode_image,
    render,
    resolve_decode,
    resolve_scoring_decode,
)
from railway_defect.data.transforms import build_transform
from railway_defect.inference.inputs import InputItem
from railway_defect.inference.model import load_predictor
from railway_defect.inference.predicting import Decision, run_prediction, score
from railway_defect.inference.service import create_app
from railway_defect.models.module import DefectClassifier
from railway_defect.training.run import run_training
from railway_defect.utils.errors import UserError
from tests.helpers import CONF_DIR, FAST, make_split_dataset, train_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPU = torch.device("cpu")


def photo(height: int = 180, width: int = 240, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: smooth shading, edges and mild sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([96 + 80 * np.sin(x / 23), 128 + 60 * np.cos(y / 17), 60 + 0.5 * x], -1)
    image[height // 3 : height // 2, :, :] = 30  # a dark rail
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def pixels(normalised: torch.Tensor) -> torch.Tensor:
    """A normalised (3, H, W) image back in 0..255 units."""
    return normalised * torch.tensor(STD).view(3, 1, 1) * 255 + torch.tensor(MEAN).view(3, 1, 1) * 255


def device_eval(images: list[np.ndarray], size: int = 160, stored: bool = True) -> torch.Tensor:
    """The device path's evaluation images (no random step), from stored JPEG bytes or raw pixels."""
    items = DeviceItems(DevicePlan(size))
    batch = collate_encoded([(items(encode_image(image))["image"], 0) for image in images])
    if stored:
        decoded = decode_on(batch.data, CPU)
    else:
        decoded = [torch.from_numpy(image).permute(2, 0, 1).contiguous() for image in images]
    return render(decoded, batch.params, size, MEAN, STD)


def augmentation(name: str, size: int = 160) -> list:
    """The transforms of conf/augmentation/<name>.yaml at image size `size`."""
    config = OmegaConf.merge(
        {"data": {"image_size": size}}, OmegaConf.load(CONF_DIR / "augmentation" / f"{name}.yaml")
    )
    return list(instantiate(config.transforms))


def test_evaluation_images_match_the_cpu_path_to_the_stated_tolerance() -> None:
    images = [photo(180, 240, 0), photo(256, 200, 1)]
    cpu = torch.stack([build_transform([], 160, MEAN, STD)(image=i)["image"] for i in images])
    # the resize itself: bilinear at pixel centres, as cv2's, within rounding (max 1 of 255)
    raw = (pixels(device_eval(images, stored=False)[0]) - pixels(cpu[0])).abs()
    assert raw.max() <= 1.0
    # the stored form (JPEG quality 95) adds its own small error: mean under 2 of 255 (1.2 on the
    # sample photos)
    for got, want in zip(device_eval(images), cpu, strict=True):
        error = (pixels(got) - pixels(want)).abs()
        assert error.mean() < 2.0 and np.percentile(error.numpy(), 99) < 12


def test_a_crop_flip_and_colour_change_match_albumentations() -> None:
    image = photo(200, 260)
    params = torch.tensor([[40.0, 30.0, 240.0, 190.0, 1.0, 0.0, 1.1, 12.0, 0.0, 0.0]])
    raw = [torch.from_numpy(image).permute(2, 0, 1).contiguous()]
    got = pixels(render(raw, params, 128, MEAN, STD)[0])
    cropped = A.Compose([A.Crop(40, 30, 240, 190), A.Resize(128, 128), A.HorizontalFlip(p=1)])(image=image)
    colour = A.RandomBrightnessContrast(p=1).apply(cropped["image"], alpha=1.1, beta=12.0)
    want = torch.from_numpy(colour.astype(np.float32)).permute(2, 0, 1)
    # inside the crop both resample the same pixels; at its border the device reads the true
    # neighbours where cv2 repeats the crop's edge
    assert (got - want)[:, 2:-2, 2:-2].abs().max() <= 2.0


def test_parameters_repeat_for_the_same_seed_and_stay_within_the_ranges() -> None:
    plan = DevicePlan.from_transforms(augmentation("light"), 160)
    assert plan.crop == ((0.7, 1.0), (0.75, 1.3333)) and plan.hflip == 0.5 and plan.colour is not None
    items = DeviceItems(plan)
    rows = []
    for seed in range(200):
        items.set_random_seed(seed)
        first = plan.sample(items.rng, 300, 400)
        items.set_random_seed(seed)
        assert np.array_equal(first, plan.sample(items.rng, 300, 400))
        rows.append(first)
    rows = np.array(rows)
    x0, y0, x1, y1 = rows[:, :4].T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 400).all() and (y1 <= 300).all()
    area = (x1 - x0) * (y1 - y0) / (300 * 400)
    assert area.min() >= 0.69 and area.max() <= 1.0
    assert 0.3 < rows[:, 4].mean() < 0.7 and set(rows[:, 5]) == {0.0}
    changed = rows[:, 6] != 1
    assert 0.3 < changed.mean() < 0.7 and (np.abs(rows[changed, 7]) <= 0.15 * 255).all()
    assert (rows[:, 8:] == 0).all()  # no down-scaling or re-compression in augmentation=light


def test_the_nuisance_augmentation_runs_on_the_device_and_a_transform_without_a_form_is_named() -> None:
    plan = DevicePlan.from_transforms(augmentation("nuisance"), 160)
    assert plan.downscale == (0.5, (0.35, 0.9)) and plan.compression == (0.7, (30, 95)) and plan.vflip == 0.5
    with pytest.raises(UnsupportedOnDevice, match="albumentations.Affine"):
        DevicePlan.from_transforms(augmentation("strong"), 160)
    with pytest.raises(UnsupportedOnDevice, match="in that order"):  # compression before a flip
        DevicePlan.from_transforms([A.ImageCompression(), A.HorizontalFlip()], 160)
    assert DevicePlan.from_transforms(augmentation("none"), 160) == DevicePlan(160)


def test_down_up_scaling_and_jpeg_recompression_match_albumentations() -> None:
    image = photo(160, 160)
    batch = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    for scale in (0.35, 0.5, 0.77):
        got = _downscaled(batch, [scale])[0].permute(1, 2, 0).numpy()
        want = A.Downscale(scale_range=(scale, scale), p=1).apply(image, scale=scale)
        assert np.abs(got - want).mean() < 1.0  # the same pixels but for rounding of a few positions
    for quality in (30, 95):
        got = _recompressed(batch, [quality])[0].permute(1, 2, 0).numpy()
        want = A.ImageCompression(p=1).apply(image, quality=quality, image_type=".jpg")
        # another encoder (libjpeg-turbo through torchvision, nvJPEG on a GPU): the same strength
        strength, expected = np.abs(got - image).mean(), np.abs(want.astype(np.float32) - image).mean()
        assert expected > 1.0 and strength == pytest.approx(expected, rel=0.05)
    assert torch.equal(_recompressed(batch, [0.0]), batch) and torch.equal(_downscaled(batch, [0.0]), batch)


@pytest.mark.parametrize(
    ("mode", "device_type", "images", "error", "expected"),
    [
        ("auto", "cuda", 5_000, None, "gpu"),
        ("auto", "cpu", 5_000, None, "cpu"),
        ("auto", "cuda", 500, None, "cpu"),
        ("auto", "cuda", 5_000, "albumentations.Affine has no device form", "cpu"),
        ("cpu", "cuda", 5_000, None, "cpu"),
        ("gpu", "cpu", 10, None, "gpu"),
    ],
)
def test_auto_decodes_on_the_device_only_where_it_pays(
    mode: str,
    device_type: str,
    images: int,
    error: str | None,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(device, "decoder_error", lambda device_type: None)  # as on a CUDA machine
    assert resolve_decode(mode, device_type, images, error) == expected


def test_a_device_torchvision_cannot_decode_on_is_named_or_left_to_the_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine decodes on CUDA")
    assert device.decoder_error("cpu") is None
    reason = device.decoder_error("cuda")
    assert reason is not None and reason.startswith("torchvision cannot decode JPEGs on cuda")
    assert resolve_decode("auto", "cuda", 5_000, None) == "cpu"
    with pytest.raises(UnsupportedOnDevice, match="data.decode=gpu: torchvision cannot decode JPEGs on cuda"):
        resolve_decode("gpu", "cuda", 5_000, None)
    assert resolve_scoring_decode("auto", "cuda", "none") is False


def test_gpu_with_an_augmentation_it_cannot_run_is_a_one_line_error(tiny_dataset: Path) -> None:
    dm = RailwayDataModule.from_settings(
        augmentation("strong"), root=tiny_dataset, image_size=32, cache_size=40, decode="gpu"
    )
    with pytest.raises(UserError, match="data.decode=gpu: albumentations.Affine .* use data.decode=cpu"):
        dm.setup("fit")
    with pytest.raises(UserError, match="data.decode='disk' is not one of auto, cpu, gpu"):
        RailwayDataModule.from_settings(root=tiny_dataset, decode="disk")


def first_epoch(root: Path, **settings) -> EncodedBatch:
    dm = RailwayDataModule.from_settings(
        augmentation("light"),
        root=root,
        image_size=32,
        cache_size=40,
        batch_size=64,
        num_workers=0,
        **settings,
    )
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    return batch


@pytest.mark.parametrize("storage", ["memory", "stream"])
def test_an_epoch_repeats_exactly_and_the_model_gets_one_batch_tensor(
    tiny_dataset: Path, tmp_path: Path, storage: str
) -> None:
    settings = {"decode": "gpu", "storage": storage, "stream_dir": tmp_path / "stream"}
    batch, again = first_epoch(tiny_dataset, **settings), first_epoch(tiny_dataset, **settings)
    assert isinstance(batch, EncodedBatch) and len(batch.data) == 12
    assert torch.equal(batch.params, again.params) and torch.equal(batch.targets, again.targets)
    assert all(torch.equal(a, b) for a, b in zip(batch.data, again.data, strict=True))
    dm = RailwayDataModule.from_settings(root=tiny_dataset, image_size=32, cache_size=40, decode="gpu")
    dm.setup("fit")
    images, targets = dm.transfer_batch_to_device(batch, CPU, 0)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(targets, batch.targets)
    assert dm.report["decode"] == "gpu"


def test_a_checkpoint_trained_on_the_device_path_scores_like_the_cpu_path(
    compose_train, tiny_dataset: Path
) -> None:
    cfg = compose_train(*FAST, f"data.root={tiny_dataset}", "data.decode=gpu")
    run_training(cfg)
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["data"]["decode"] == "gpu"
    model = DefectClassifier.load_from_checkpoint(metrics["checkpoints"]["best"], pretrained=False)
    cpu_path = RailwayDataModule.from_settings(
        root=tiny_dataset, image_size=64, cache_size=72, batch_size=4, num_workers=0, decode="cpu"
    )
    (validated,) = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(
        model, cpu_path
    )
    assert validated["val/loss"] == pytest.approx(metrics["val"]["val/loss"], abs=0.02)


def test_auto_storage_counts_the_device_paths_jpeg_bytes(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [p for p in tiny_dataset.rglob("*") if p.is_file()]
    pixels_bytes = storage.estimate_decoded_bytes(paths, 40, "none")
    monkeypatch.setattr(storage, "available_memory", lambda: pixels_bytes)  # twice MEMORY_SHARE's room
    assert storage.choose_storage("auto", paths, 40, "none") == "stream"
    assert storage.choose_storage("auto", paths, 40, "none", encoded=True) == "memory"


def test_auto_stays_on_the_cpu_path_outside_cuda(tiny_dataset: Path) -> None:
    dm = RailwayDataModule.from_settings(root=tiny_dataset, image_size=32, cache_size=40)
    dm.setup("fit")
    assert dm.decode_used == "cpu" and device.AUTO_MIN_IMAGES > 1_000
    x, _ = next(iter(dm.val_dataloader()))
    assert isinstance(x, torch.Tensor)


# ---- predict and serve -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained on generated photos (the CPU path)."""
    root = make_split_dataset(tmp_path_factory.mktemp("data"), {"Train": 6, "Validation": 3})
    cfg = train_config(tmp_path_factory.mktemp("run"), *FAST, f"data.root={root}", "logger=csv")
    run_training(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"


def write_photos(folder: Path, count: int = 6) -> list[Path]:
    """640x480 camera-like JPEGs, a PNG and a JPEG whose EXIF says it is rotated."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"photo_{i}.jpg")
        Image.fromarray(photo(480, 640, seed=i)).save(paths[-1], quality=90)
    Image.fromarray(photo(300, 400, seed=9)).save(folder / "scan.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    Image.fromarray(photo(240, 320, seed=10)).save(folder / "rotated.jpg", exif=exif)
    return paths


def test_predict_decodes_jpegs_on_the_device_and_scores_like_the_cpu_path(
    checkpoint: Path, tmp_path: Path
) -> None:
    write_photos(tmp_path / "in")
    for decode in ("cpu", "gpu"):
        run_prediction(
            str(checkpoint), str(tmp_path / "in"), tmp_path / f"{decode}.csv", progress=False, decode=decode
        )
    cpu, gpu = (list(csv.DictReader((tmp_path / f"{d}.csv").open())) for d in ("cpu", "gpu"))
    assert [r["path"] for r in cpu] == [r["path"] for r in gpu] and len(gpu) == 8
    for a, b in zip(cpu, gpu, strict=True):
        assert not a["error"] and not b["error"]
        assert float(b["p_Defective"]) == pytest.approx(float(a["p_Defective"]), abs=0.01)


def test_only_plain_jpegs_are_kept_as_bytes_for_the_device(checkpoint: Path, tmp_path: Path) -> None:
    write_photos(tmp_path)
    predictor = load_predictor(checkpoint, "cpu", decode="gpu")
    assert predictor.decode_on_device
    kept = {p.name: predictor.decode(p.read_bytes()) for p in sorted(tmp_path.iterdir())}
    assert isinstance(kept["photo_0.jpg"], EncodedImage) and kept["photo_0.jpg"].height == 480
    assert isinstance(kept["scan.png"], np.ndarray) and isinstance(kept["rotated.jpg"], np.ndarray)
    assert kept["rotated.jpg"].shape[0] > kept["rotated.jpg"].shape[1]  # turned upright by the CPU
    assert not load_predictor(checkpoint, "cpu", decode="auto").decode_on_device  # auto: CUDA only


def test_a_jpeg_the_device_cannot_decode_is_decoded_on_the_cpu(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_photos(tmp_path, count=3)
    real = device.decode_on

    def fails_on_the_second(data: list[torch.Tensor], on: torch.device) -> list[torch.Tensor]:
        if any(torch.equal(d, torch.from_numpy(np.fromfile(paths[1], np.uint8))) for d in data):
            raise RuntimeError("nvjpeg: bad bitstream")
        return real(data, on)

    monkeypatch.setattr(device, "decode_on", fails_on_the_second)
    predictor = load_predictor(checkpoint, "cpu", decode="gpu")
    items = [InputItem(str(p), image=predictor.decode(p.read_bytes())) for p in paths]
    probs = score(predictor, items)
    assert all(p is not None for p in probs)
    assert isinstance(items[1].image, np.ndarray) and isinstance(items[0].image, EncodedImage)
    on_cpu = load_predictor(checkpoint, "cpu", decode="cpu")
    expected = score(on_cpu, [InputItem(str(p), image=on_cpu.decode(p.read_bytes())) for p in paths])
    for got, want in zip(probs, expected, strict=True):
        assert got == pytest.approx(want, abs=0.01)


def test_gpu_decode_of_a_thumbnail_model_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "decoder_error", lambda device_type: None)  # as on a CUDA machine
    assert resolve_scoring_decode("auto", "cuda", "thumbnail") is False
    with pytest.raises(UnsupportedOnDevice, match="data.harmonize=thumbnail.*use decode=cpu"):
        resolve_scoring_decode("gpu", "cuda", "thumbnail")
    assert resolve_scoring_decode("auto", "cuda", "none") is True


def test_serve_decodes_uploads_on_the_device_and_refuses_a_truncated_jpeg(
    checkpoint: Path, tmp_path: Path
) -> None:
    (path,) = write_photos(tmp_path, count=1)
    truncated = path.read_bytes()[: path.stat().st_size // 2]
    on_cpu = load_predictor(checkpoint, "cpu", decode="cpu")
    (expected,) = score(on_cpu, [InputItem(path.name, image=on_cpu.decode(path.read_bytes()))])
    client = TestClient(
        create_app(load_predictor(checkpoint, "cpu", decode="gpu"), Decision.from_config(0.5, 1.0, None))
    )
    response = client.post("/predict", files=[("files", (path.name, path.read_bytes(), "image/jpeg"))])
    assert response.status_code == 200, response.text
    (row,) = response.json()["predictions"]
    assert row["p_Defective"] == pytest.approx(float(expected[0]), abs=0.01)
    refused = client.post("/predict", files=[("files", ("cut.jpg", truncated, "image/jpeg"))])
    assert refused.status_code == 415 and "truncated" in refused.text
    # predict: the same file is a row with its error, the others are scored
    (tmp_path / "cut.jpg").write_bytes(truncated)
    summary = run_prediction(str(checkpoint), str(tmp_path), tmp_path / "p.csv", progress=False, decode="gpu")
    assert summary.rows == 4 and summary.failed == 1


def test_the_device_path_streams_jpeg_bytes_from_a_folder_of_its_own(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    modules = {
        decode: RailwayDataModule.from_settings(
            root=tiny_dataset,
            image_size=32,
            cache_size=40,
            storage="stream",
            stream_dir=tmp_path,
            decode=decode,
        )
        for decode in ("cpu", "gpu")
    }
    for dm in modules.values():
        dm.setup("fit")
    arrays, jpegs = (modules[d].backend.images("val", modules[d].splits["val"]) for d in ("cpu", "gpu"))
    assert modules["cpu"].streams["val"][0] != modules["gpu"].streams["val"][0]
    for array, jpeg in zip(arrays, jpegs, strict=True):
        assert isinstance(jpeg, EncodedImage) and (jpeg.height, jpeg.width) == array.shape[:2]
        assert np.array_equal(jpeg.data, encode_image(array).data)  # the encoding of the same pixels

"""Decoding: every common mode and format to small RGB, EXIF orientation, clear failures, and a
cache that is hit instead of decoding again."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from railway_defect.data import images
from railway_defect.data.images import DecodeError, decode_files, decode_image, load_image_file


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("I;16", "PNG"),
        ("CMYK", "JPEG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("RGB", "TIFF"),
    ],
)
def test_any_mode_and_format_decodes_to_rgb_uint8(mode: str, fmt: str) -> None:
    if mode == "I;16":
        source = Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
    else:
        source = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode)
    array = decode_image(encode(source, fmt), min_side=64)
    assert array.dtype == np.uint8
    assert array.shape == (30, 40, 3)
    if mode == "I;16":
        assert 150 < array.mean() < 160  # 40000 / 65535 * 255


def test_transparency_is_composited_on_white() -> None:
    source = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert (decode_image(encode(source, "PNG"), 64) == 255).all()


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    array = decode_image(encode(source, "JPEG", exif=exif), 256)
    assert array.shape == (60, 20, 3)


def test_large_jpeg_is_decoded_small() -> None:
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8))
    array = decode_image(encode(source, "JPEG"), 256)
    assert array.shape == (256, 341, 3)


@pytest.mark.parametrize(
    ("data", "reason"), [(b"", "empty"), (b"this is text, not a jpeg", "cannot identify")]
)
def test_unreadable_bytes_raise_decode_error(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_image(data, 64)


def test_truncated_jpeg_raises_decode_error() -> None:
    data = encode(Image.new("RGB", (200, 200), (1, 2, 3)), "JPEG")
    with pytest.raises(DecodeError):
        decode_image(data[: len(data) // 2], 64)


def test_disk_cache_is_keyed_by_content_and_hit(tmp_path: Path, make_image, monkeypatch) -> None:
    path = make_image(tmp_path / "a.png", size=(90, 80))
    first, digest = load_image_file(path, 64, cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / f"{digest}-64.npy").is_file()
    calls = []
    monkeypatch.setattr(images, "decode_image", lambda *a: calls.append(a))
    second, _ = load_image_file(path, 64, cache_dir=tmp_path / "cache")
    assert calls == []
    np.testing.assert_array_equal(first, second)


def test_decode_files_reports_failures_and_keeps_the_rest(tmp_path: Path, make_image) -> None:
    good = make_image(tmp_path / "good.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    decoded = decode_files([good, bad], 64)
    assert list(decoded.images) == [good]
    assert list(decoded.failures) == [bad]

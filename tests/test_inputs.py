"""What predict reads: folders, globs, single files and videos become items lazily; unreadable
inputs become items with their error; rows are written as they come and only renamed at the end."""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from railway_defect.data.images import decode_image
from railway_defect.inference.inputs import InputItem, batched, iter_inputs, list_sources
from railway_defect.inference.predicting import CsvRowWriter, Decision
from railway_defect.utils.errors import UserError
from tests.helpers import write_rgba, write_video

MIN_SIDE = 32


def decode(data: bytes) -> np.ndarray:
    return decode_image(data, MIN_SIDE)


@pytest.fixture
def mixed_folder(tmp_path: Path, make_image) -> Path:
    root = tmp_path / "photos"
    make_image(root / "a.jpg")
    make_image(root / "nested" / "deeper" / "b.png")
    write_rgba(root / "nested" / "alpha.png")
    (root / "broken.jpg").write_bytes(b"definitely not a jpeg")
    (root / "notes.txt").write_text("ignored: not an image or video extension")
    make_image(root / ".hidden" / "c.jpg")
    write_video(root / "clip.mp4")
    return root


def test_folder_is_searched_recursively_for_images_and_videos(mixed_folder: Path) -> None:
    names = [p.relative_to(mixed_folder).as_posix() for p in list_sources(mixed_folder)]
    assert names == ["a.jpg", "broken.jpg", "clip.mp4", "nested/alpha.png", "nested/deeper/b.png"]


def test_glob_and_single_file(mixed_folder: Path) -> None:
    assert [p.name for p in list_sources(f"{mixed_folder}/**/*.png")] == ["alpha.png", "b.png"]
    assert list_sources(mixed_folder / "notes.txt") == [mixed_folder / "notes.txt"]  # named: tried anyway
    with pytest.raises(UserError, match="does not exist"):
        list_sources(mixed_folder / "missing")
    with pytest.raises(UserError, match="no image or video"):
        list_sources(f"{mixed_folder}/*.gif")


def test_items_carry_images_errors_and_video_frames(mixed_folder: Path) -> None:
    items = list(iter_inputs(list_sources(mixed_folder), decode, MIN_SIDE, every_s=1.0, chunk=2))
    by_name = {}
    for item in items:
        by_name.setdefault(Path(item.path).name, []).append(item)
    assert by_name["broken.jpg"][0].image is None and "cannot identify" in by_name["broken.jpg"][0].error
    alpha = by_name["alpha.png"][0].image
    assert alpha.shape == (32, 48, 3)  # 40x60 shrunk to a shorter side of 32, RGB
    assert tuple(alpha[0, 0]) == (200, 0, 0) and tuple(alpha[0, -1]) == (255, 255, 255)  # on white
    frames = by_name["clip.mp4"]
    assert [(f.frame, f.time_s) for f in frames] == [(0, 0.0), (10, 1.0), (20, 2.0), (30, 3.0)]
    assert all(f.image is not None and min(f.image.shape[:2]) == MIN_SIDE and not f.error for f in frames)
    assert by_name["a.jpg"][0].frame is None and by_name["a.jpg"][0].time_s is None


def test_video_sampling_interval_and_unreadable_video(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.avi", frames=12, fps=4.0)
    frames = list(iter_inputs([video], decode, MIN_SIDE, every_s=0.5))
    assert [f.frame for f in frames] == [0, 2, 4, 6, 8, 10]
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"no video in here")
    (item,) = list(iter_inputs([fake], decode, MIN_SIDE))
    assert item.image is None and "video" in item.error
    with pytest.raises(UserError, match="every_s"):
        list(iter_inputs([video], decode, MIN_SIDE, every_s=0))


def write_variable_rate_video(path: Path, times_ms: list[int], size: tuple[int, int] = (96, 64)) -> Path:
    """An MP4 whose frames carry the given timestamps (a phone video that pauses and bursts)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), i * 20, np.uint8), "rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_variable_rate_video_frames_are_timed_by_their_timestamps(tmp_path: Path) -> None:
    times_ms = [0, 100, 200, 300, 400, 1400, 1500, 2600, 2700]
    video = write_variable_rate_video(tmp_path / "phone.mp4", times_ms)
    capture = cv2.VideoCapture(str(video))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    assert abs(5 / fps - 1.4) > 0.1  # index / fps would put frame 5 elsewhere
    frames = list(iter_inputs([video], decode, MIN_SIDE, every_s=1.0))
    assert [(f.frame, f.time_s) for f in frames] == [(0, 0.0), (5, 1.4), (7, 2.6)]
    # every frame, each at its own time
    frames = list(iter_inputs([video], decode, MIN_SIDE, every_s=0.01))
    assert [f.time_s for f in frames] == [t / 1000 for t in times_ms]
    assert all(f.image is not None and not f.error for f in frames)


def test_batched_keeps_order_and_remainder() -> None:
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_rows_are_renamed_into_place_only_at_the_end(tmp_path: Path) -> None:
    output = tmp_path / "out" / "predictions.csv"
    with CsvRowWriter(output, ["path", "needs_review", "error"]) as writer:
        writer.write([{"path": "a.jpg", "needs_review": True, "error": ""}])
        assert not output.exists()
    with output.open(newline="") as f:
        assert list(csv.DictReader(f)) == [{"path": "a.jpg", "needs_review": "true", "error": ""}]

    with pytest.raises(KeyboardInterrupt), CsvRowWriter(output, ["path", "needs_review", "error"]) as writer:
        writer.write([{"path": "b.jpg", "needs_review": None, "error": "x"}])
        raise KeyboardInterrupt
    assert "a.jpg" in output.read_text()  # the finished file is untouched
    assert "b.jpg" in output.with_name("predictions.csv.partial").read_text()
    assert not [p for p in output.parent.iterdir() if p.name.endswith(".tmp")]


def test_decision_labels_and_review_band() -> None:
    decision = Decision.from_config(0.3, 1.0, None)
    classes = ["Defective", "Non defective"]
    assert decision.label(np.array([0.31, 0.69]), classes, 0) == "Defective"
    assert decision.label(np.array([0.29, 0.71]), classes, 0) == "Non defective"
    low, high = decision.review_band
    assert low < 0.3 < high and decision.needs_review(0.3) and not decision.needs_review(0.95)
    assert Decision.from_config(0.3, 1.0, [0.2, 0.4]).review_band == (0.2, 0.4)
    with pytest.raises(UserError):
        Decision.from_config(0.3, 1.0, [0.6, 0.4])
    # three classes: below the threshold, the likeliest other class
    assert decision.label(np.array([0.2, 0.3, 0.5]), ["D", "N", "O"], 0) == "O"


def test_input_item_defaults() -> None:
    item = InputItem("x.jpg", error="empty file")
    assert item.image is None and item.frame is None and item.time_s is None


def test_decoding_threads_follow_the_cpus_this_process_may_use(
    tmp_path: Path, make_image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.cpu_count() counts the whole machine (128 on a node where SLURM gave the job 3 CPUs)."""
    from railway_defect.data import images
    from railway_defect.inference import inputs
    from railway_defect.utils import resources

    monkeypatch.setattr(resources.os, "cpu_count", lambda: 128)
    monkeypatch.setattr(resources, "_usable_cpu_ids", lambda: {0, 1, 2})
    pools: list[int] = []

    class RecordingPool(ThreadPoolExecutor):
        def __init__(self, max_workers: int | None = None) -> None:
            pools.append(max_workers)
            super().__init__(max_workers)

    monkeypatch.setattr(images, "ThreadPoolExecutor", RecordingPool)
    monkeypatch.setattr(inputs, "ThreadPoolExecutor", RecordingPool)
    photo = make_image(tmp_path / "a.png")
    assert len(images.decode_files([photo], MIN_SIDE).images) == 1
    assert len(list(iter_inputs([photo], decode, MIN_SIDE))) == 1
    assert pools == [3, 3]

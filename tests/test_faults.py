"""Faults found by trying (issue 12, section 5): checkpoints across filesystems, full and read-only
disks in every command, data that was silently misread, an offline start and serve's file limit."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict

from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.data.discovery import discover
from railway_defect.training.checks import resolve_ckpt_path
from railway_defect.training.run import resolve_hardware_defaults, run_training
from railway_defect.utils.commands import run_command
from railway_defect.utils.errors import UserError
from tests.helpers import (
    CLASSES,
    CONF_DIR,
    FAST,
    OFFLINE_ENV,
    PROJECT_ROOT,
    make_split_dataset,
    save_half_then_fail,
    train_config,
    write_image,
)

# ---- data that was silently misread -------------------------------------------------------------------


def write_manifest(root: Path, rows: list[str], encoding: str = "utf-8") -> None:
    (root / "manifest.csv").write_bytes(("\n".join(["path,label,split", *rows]) + "\n").encode(encoding))


def manifest_dataset(root: Path, per_class: int = 4) -> list[str]:
    """Images root/img/<i>.png with one manifest row each (train, then two of each class in val)."""
    rows = []
    for i in range(2 * per_class):
        write_image(root / "img" / f"{i}.png", label_index=i % 2, seed=i)
        rows.append(f"img/{i}.png,{CLASSES[i % 2]},{'val' if i >= 2 * per_class - 4 else 'train'}")
    return rows


def test_a_symlink_to_a_folder_inside_the_root_is_not_a_class(tmp_path: Path, caplog) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 2, "Validation": 1})
    (root / "Train" / "loop").symlink_to(root / "Train")
    (root / "Validation" / "up").symlink_to(tmp_path)  # a folder that holds the root
    with caplog.at_level(logging.WARNING):
        index = discover(root)
    assert index.classes == sorted(CLASSES)
    assert index.counts()["train"] == {"Defective": 2, "Non defective": 2}
    assert index.counts()["val"] == {"Defective": 1, "Non defective": 1}
    assert [Path(i["path"]).name for i in index.ignored] == ["loop", "up"]
    assert any("loop" in r.getMessage() and "inside the data root" in r.getMessage() for r in caplog.records)


def test_a_symlinked_class_folder_elsewhere_is_followed_with_a_warning(tmp_path: Path, caplog) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 2, "Validation": 1}, classes=("Defective",))
    elsewhere = make_split_dataset(tmp_path / "other_disk", {"Train": 2, "Validation": 1}, classes=("Ok",))
    for split in ("Train", "Validation"):
        (root / split / "Ok").symlink_to(elsewhere / split / "Ok")
    with caplog.at_level(logging.WARNING):
        index = discover(root)
    assert index.counts()["train"] == {"Defective": 2, "Ok": 2}
    assert any("Following the symlink" in r.getMessage() for r in caplog.records)


def test_a_manifest_label_typo_is_an_error_naming_the_near_miss(tmp_path: Path) -> None:
    rows = manifest_dataset(tmp_path)
    write_image(tmp_path / "img" / "typo.png", seed=99)
    write_manifest(tmp_path, [*rows, "img/typo.png,Defectve,train"])
    with pytest.raises(UserError, match=r"line 10: label 'Defectve' .* typo of 'Defective'"):
        discover(tmp_path)


def test_labels_that_only_look_alike_are_two_classes(tmp_path: Path) -> None:
    rows = [
        r.replace("Non defective", "non-defective").replace("Defective", "defective")
        for r in manifest_dataset(tmp_path)
    ]
    write_manifest(tmp_path, rows)
    assert discover(tmp_path).classes == ["defective", "non-defective"]


def test_a_row_listed_twice_is_used_once_with_a_warning_and_a_report_line(tmp_path: Path, caplog) -> None:
    rows = manifest_dataset(tmp_path)
    write_manifest(tmp_path, [*rows, rows[0].replace("img/", "./img/")])
    with caplog.at_level(logging.WARNING):
        dm = RailwayDataModule.from_settings(
            root=tmp_path, image_size=32, cache_size=40, batch_size=4, num_workers=0
        )
        dm.setup("fit")
    assert sum(len(s) for s in dm.splits.values()) == 8
    (entry,) = dm.report["ignored"]
    assert (
        entry["path"].endswith("0.png")
        and "listed twice" in entry["reason"]
        and "lines 2 and 10" in entry["reason"]
    )
    assert any("listed twice" in r.getMessage() for r in caplog.records)


def test_one_file_under_two_labels_is_an_error(tmp_path: Path) -> None:
    rows = manifest_dataset(tmp_path)
    write_manifest(tmp_path, [*rows, "img/0.png,Non defective,train"])
    with pytest.raises(
        UserError, match=r"img/0.png is listed on line 2 as Defective .* line 10 as Non defective"
    ):
        discover(tmp_path)


def test_a_manifest_path_outside_the_root_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rows = manifest_dataset(root)
    write_image(tmp_path / "outside_root.jpg")
    write_manifest(root, [*rows, "../outside_root.jpg,Defective,train"])
    with pytest.raises(UserError, match=r"line 10: path '../outside_root.jpg' points outside the data root"):
        discover(root)


def test_images_the_manifest_does_not_list_are_counted_and_reported(tmp_path: Path, caplog) -> None:
    rows = manifest_dataset(tmp_path)
    write_manifest(tmp_path, rows)
    for i in range(3):
        write_image(tmp_path / "img" / "new" / f"unlisted_{i}.jpg", seed=50 + i)
    with caplog.at_level(logging.WARNING):
        index = discover(tmp_path)
    assert sum(len(s) for s in index.splits.values()) == 8
    assert sorted(Path(i["path"]).name for i in index.ignored) == [f"unlisted_{i}.jpg" for i in range(3)]
    assert all(i["reason"] == "not listed in manifest.csv" for i in index.ignored)
    assert any(r.getMessage().startswith("3 image file(s)") for r in caplog.records)


def test_a_latin1_manifest_is_a_one_line_error(tmp_path: Path) -> None:
    rows = manifest_dataset(tmp_path)
    write_image(tmp_path / "img" / "défaut.png", seed=42)
    write_manifest(tmp_path, [*rows, "img/défaut.png,Defective,train"], encoding="latin-1")
    with pytest.raises(UserError, match=r"is not UTF-8 \(byte 0xe9 on line 10\); save it as UTF-8"):
        discover(tmp_path)


# ---- checkpoints ------------------------------------------------------------------------------------


@pytest.fixture
def configured_trainer(tmp_path: Path) -> Iterator:
    """The Trainer that conf/trainer builds, as train does."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.accelerator=cpu", "logger=[]"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    resolve_hardware_defaults(cfg)
    yield instantiate(cfg.trainer, logger=False, enable_progress_bar=False, enable_model_summary=False)
    GlobalHydra.instance().clear()


def test_checkpoints_are_written_beside_their_destination_not_in_tmpdir(
    configured_trainer, tmp_path: Path, monkeypatch
) -> None:
    """With $TMPDIR on another filesystem, a temporary file there turns the final rename into a copy
    that a kill -9 or a full disk stops half-way (a truncated last.ckpt, an orphan in $TMPDIR)."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    destination = tmp_path / "run" / "checkpoints"
    written: list[Path] = []
    recording = [True]

    def hook(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (flags and flags & (os.O_WRONLY | os.O_RDWR)):
                written.append(Path(args[0]).absolute())

    sys.addaudithook(hook)  # audit hooks cannot be removed: this one stops recording at the end
    try:
        checkpoint_io = configured_trainer.strategy.checkpoint_io
        checkpoint_io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}}, destination / "last.ckpt")
    finally:
        recording[0] = False
    assert written and all(p.parent == destination for p in written), written
    assert list(tmpdir.iterdir()) == []
    assert sorted(p.name for p in destination.iterdir()) == ["last.ckpt"]


def test_a_temporary_file_left_by_kill_9_is_removed_at_the_next_save(
    configured_trainer, tmp_path: Path
) -> None:
    destination = tmp_path / "run" / "checkpoints"
    destination.mkdir(parents=True)
    (destination / ".last.ckpt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (destination / ".best.ckpt.other.tmp").write_bytes(b"someone else's")
    configured_trainer.strategy.checkpoint_io.save_checkpoint(
        {"w": torch.zeros(3)}, destination / "last.ckpt"
    )
    assert sorted(p.name for p in destination.iterdir()) == [".best.ckpt.other.tmp", "last.ckpt"]


def test_a_full_disk_during_a_checkpoint_leaves_no_file(
    configured_trainer, tmp_path: Path, monkeypatch
) -> None:
    destination = tmp_path / "run" / "checkpoints"
    checkpoint_io = configured_trainer.strategy.checkpoint_io
    checkpoint_io.save_checkpoint({"w": torch.zeros(3)}, destination / "last.ckpt")
    before = (destination / "last.ckpt").read_bytes()
    monkeypatch.setattr(torch, "save", save_half_then_fail(torch.save))
    for name in ("last.ckpt", "best.ckpt"):  # an earlier file, and a first one
        with pytest.raises(OSError, match="No space left"):
            checkpoint_io.save_checkpoint({"w": torch.ones(3)}, destination / name)
    assert sorted(p.name for p in destination.iterdir()) == ["last.ckpt"]
    assert (destination / "last.ckpt").read_bytes() == before


def save_tiny_checkpoint(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": "resnet18"}}, path)
    return path


def test_ckpt_path_last_falls_back_to_the_newest_readable_checkpoint(tmp_path: Path, caplog) -> None:
    runs = tmp_path / "runs"
    older = save_tiny_checkpoint(runs / "2024-01-01" / "checkpoints" / "last.ckpt")
    best = save_tiny_checkpoint(runs / "2024-01-02" / "checkpoints" / "best.ckpt")
    last = save_tiny_checkpoint(runs / "2024-01-02" / "checkpoints" / "last.ckpt")
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut short by a kill
    os.utime(older, (1, 1))
    with caplog.at_level(logging.WARNING):
        resolved = resolve_ckpt_path("last", tmp_path / "new_run", runs)
    assert resolved == best
    assert any("not a readable checkpoint" in r.getMessage() for r in caplog.records)
    # the run's own last.ckpt, cut short: its best.ckpt
    assert resolve_ckpt_path("last", runs / "2024-01-02", runs) == best
    best.write_bytes(b"")
    older.write_bytes(b"PK")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        resolve_ckpt_path("last", tmp_path / "new_run", runs)


def test_ckpt_path_last_in_a_sweep_job_takes_only_the_jobs_own_checkpoint(tmp_path: Path) -> None:
    """A sweep continued with ckpt_path=last: each job resumes from its own last.ckpt; a job that
    never ran starts afresh instead of continuing another fold's or seed's model."""
    sweep = tmp_path / "sweep"
    own = save_tiny_checkpoint(sweep / "0" / "checkpoints" / "last.ckpt")
    save_tiny_checkpoint(sweep / "1" / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("last", sweep / "0", None) == own
    assert resolve_ckpt_path("last", sweep / "2", None) is None


# ---- full and read-only disks in every command ---------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(best.ckpt of a one-epoch run at 32 px, its data)."""
    tmp = tmp_path_factory.mktemp("faults")
    data = make_split_dataset(tmp / "data", {"Train": 4, "Validation": 2})
    cfg = train_config(
        tmp / "run",
        *FAST,
        f"data.root={data}",
        "data.image_size=32",
        "data.cache_size=40",
        "trainer.max_epochs=1",
        "logger=[]",
        "callbacks.learning_rate_monitor=null",
    )
    run_training(cfg)
    return tmp / "run" / "checkpoints" / "best.ckpt", data


def one_line_exit(run) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_command(run)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_predict_onto_an_existing_directory_is_one_line(checkpoint, tmp_path: Path) -> None:
    from railway_defect.inference.predicting import run_prediction

    ckpt, data = checkpoint
    message = one_line_exit(
        lambda: run_prediction(str(ckpt), str(data / "Validation"), tmp_path, progress=False)
    )
    assert "is a directory" in message
    assert list(tmp_path.iterdir()) == []


def test_predict_into_a_read_only_folder_is_one_line(checkpoint, tmp_path: Path, monkeypatch) -> None:
    from railway_defect.inference.predicting import run_prediction

    ckpt, data = checkpoint
    read_only = tmp_path / "read_only"
    read_only.mkdir()

    def mkstemp(*args, dir=None, **kwargs):  # chmod does not stop root: simulate a read-only mount
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    message = one_line_exit(
        lambda: run_prediction(str(ckpt), str(data / "Validation"), read_only / "p.csv", progress=False)
    )
    assert "Read-only file system" in message
    assert list(read_only.iterdir()) == []


def test_predict_on_a_full_disk_keeps_the_earlier_output_and_leaves_no_temporary(
    checkpoint, tmp_path: Path, monkeypatch
) -> None:
    from railway_defect.inference import predicting

    ckpt, data = checkpoint
    output = tmp_path / "predictions.csv"
    output.write_text("earlier results\n")
    real_writerows = predicting.csv.DictWriter.writerows
    calls = [0]

    def writerows_then_full(self, rows):  # the disk fills up after the first batch
        calls[0] += 1
        if calls[0] > 1:
            disk_full()
        return real_writerows(self, rows)

    monkeypatch.setattr(predicting.csv.DictWriter, "writerows", writerows_then_full)
    message = one_line_exit(
        lambda: predicting.run_prediction(
            str(ckpt), str(data / "Validation"), output, batch_size=1, progress=False
        )
    )
    assert "No space left on device" in message
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]
    assert output.read_text() == "earlier results\n"


def test_evaluate_on_a_full_disk_is_one_line_and_leaves_no_temporary(
    checkpoint, tmp_path: Path, monkeypatch
) -> None:
    from railway_defect.evaluation.report import run_evaluation

    ckpt, data = checkpoint
    out = tmp_path / "evaluation"
    monkeypatch.setattr(os, "fsync", disk_full)  # where a full disk shows up last: the flush to disk
    message = one_line_exit(
        lambda: run_evaluation(
            str(ckpt), str(data), output_dir=str(out), bootstrap=10, store_calibration=False, device="cpu"
        )
    )
    assert "No space left on device" in message
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_export_on_a_full_disk_is_one_line_and_leaves_no_temporary(
    checkpoint, tmp_path: Path, monkeypatch
) -> None:
    from railway_defect.inference.exporting import export_model

    ckpt, _ = checkpoint
    monkeypatch.setattr(os, "fsync", disk_full)
    message = one_line_exit(
        lambda: export_model(str(ckpt), "torchscript", tmp_path / "model.pt", check=False)
    )
    assert "No space left on device" in message
    assert list(tmp_path.iterdir()) == []


# ---- offline start and serve --------------------------------------------------------------------------


def test_importing_the_package_makes_no_network_request() -> None:
    """albumentations asks PyPI for updates when imported, unless told not to."""
    code = (
        "import sys\n"
        "events = []\n"
        "network = ('urllib.Request', 'socket.connect')\n"
        "sys.addaudithook(lambda e, a: events.append(e) if e in network else None)\n"
        "import railway_defect.data.transforms\n"
        "print(events)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={**env, **OFFLINE_ENV},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert "Failed to check for updates" not in result.stderr


def test_serve_answers_413_for_more_than_max_files() -> None:
    from fastapi.testclient import TestClient

    from railway_defect.inference.predicting import Decision
    from railway_defect.inference.service import create_app

    app = create_app(predictor=None, decision=Decision(0.5, (0.3, 0.7)), max_files=32)  # type: ignore[arg-type]
    files = [("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(40)]
    response = TestClient(app).post("/predict", files=files)
    assert response.status_code == 413, response.text
    assert "max_files=32" in response.json()["error"]


def test_the_service_counts_requests_codes_latency_and_images(tmp_path: Path) -> None:
    """GET /metrics in Prometheus' text format: requests by endpoint and code, latency, images."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from railway_defect.inference.model import load_predictor
    from railway_defect.inference.predicting import Decision
    from railway_defect.inference.service import create_app

    tiny_checkpoint(tmp_path / "m.ckpt", 32)
    client = TestClient(
        create_app(load_predictor(tmp_path / "m.ckpt", "cpu"), Decision.from_config(0.5, 1.0, None))
    )
    photos = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    ok = client.post("/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in photos])
    assert ok.status_code == 200
    assert client.post("/predict", files=[("files", ("empty.jpg", b"", "image/jpeg"))]).status_code == 400
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples[("railway_requests_total", (("code", "200"), ("endpoint", "/predict")))] == 1
    assert samples[("railway_requests_total", (("code", "400"), ("endpoint", "/predict")))] == 1
    assert samples[("railway_request_seconds_count", (("endpoint", "/predict"),))] == 2
    assert samples[("railway_images_scored_total", ())] == 2


def _rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the RSS from /proc")
def test_the_service_stops_growing_after_a_warm_up(tmp_path: Path) -> None:
    """Memory of a long-running service: after 50 requests of warm-up, 300 more (1-4 photos each,
    a bad one among every six) add under 50 MB."""
    from fastapi.testclient import TestClient

    from railway_defect.inference.model import load_predictor
    from railway_defect.inference.predicting import Decision
    from railway_defect.inference.service import create_app

    tiny_checkpoint(tmp_path / "m.ckpt", 64)
    client = TestClient(
        create_app(load_predictor(tmp_path / "m.ckpt", "cpu"), Decision.from_config(0.5, 1.0, None))
    )
    photos = [write_image(tmp_path / f"{i}.jpg", size=(320, 240), seed=i).read_bytes() for i in range(4)]

    def send(i: int) -> None:
        files = [("files", (f"{k}.jpg", photos[k], "image/jpeg")) for k in range(1 + i % 4)]
        if i % 6 == 5:
            files = [("files", ("bad.jpg", b"not an image", "image/jpeg"))]
        assert client.post("/predict", files=files).status_code == (415 if i % 6 == 5 else 200)

    for i in range(50):
        send(i)
    before = _rss_mb()
    for i in range(300):
        send(i)
    assert _rss_mb() - before < 50


def tiny_checkpoint(path: Path, size: int) -> Path:
    """A checkpoint of an untrained ResNet-18 at `size` px: what a service loads, in a second."""
    from railway_defect.models.contract import ModelContract
    from railway_defect.models.module import DefectClassifier

    contract = ModelContract.for_backbone("resnet18", CLASSES, "Defective", size)
    model = DefectClassifier("resnet18", contract, pretrained=False)
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    return path


def test_a_request_not_scored_in_time_is_answered_503(tmp_path: Path, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    from railway_defect.inference import service
    from railway_defect.inference.model import load_predictor
    from railway_defect.inference.predicting import Decision

    real = service.score
    monkeypatch.setattr(service, "score", lambda *a, **k: (time.sleep(1.0), real(*a, **k))[1])
    predictor = load_predictor(tiny_checkpoint(tmp_path / "m.ckpt", 32), "cpu")
    client = TestClient(
        service.create_app(predictor, Decision.from_config(0.5, 1.0, None), request_timeout_s=0.2)
    )
    photo = write_image(tmp_path / "a.png").read_bytes()
    response = client.post("/predict", files=[("files", ("a.png", photo, "image/png"))])
    assert response.status_code == 503 and "request_timeout_s=0.2" in response.json()["error"]


# the service with its scoring slowed by argv[1] seconds, to have a request in flight on demand
SLOW_SERVICE = (
    "import sys, time; import railway_defect.inference.service as service; real = service.score; "
    "delay = float(sys.argv.pop(1)); service.score = lambda *a, **k: (time.sleep(delay), real(*a, **k))[1]; "
    "from railway_defect.serve import main; main()"
)


def _serve(tmp_path: Path, *args: str, delay: float | None = None) -> tuple[subprocess.Popen, str]:
    """A service process on a free port of 127.0.0.1, once it answers /health."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    checkpoint = tiny_checkpoint(tmp_path / "m.ckpt", 32)
    options = [
        f"ckpt_path={checkpoint}",
        f"port={port}",
        "device=cpu",
        f"hydra.run.dir={tmp_path / 'serve'}",
        *args,
    ]
    start = ["-c", SLOW_SERVICE, str(delay)] if delay else ["-m", "railway_defect.serve"]
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, *start, *options],
            cwd=PROJECT_ROOT,
            env={**os.environ, **OFFLINE_ENV},
            stdout=log,
            stderr=log,
        )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        assert process.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        assert time.monotonic() < deadline, "the service did not start within 180 s"
        time.sleep(0.3)


def test_sigterm_lets_the_requests_in_flight_finish(tmp_path: Path) -> None:
    """Graceful shutdown: a request being scored when SIGTERM arrives is answered, then the
    service ends."""
    import threading

    import httpx

    process, url = _serve(tmp_path, delay=2.0)
    photo = write_image(tmp_path / "a.png").read_bytes()
    answers: list[int] = []
    request = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                f"{url}/predict", files=[("files", ("a.png", photo, "image/png"))], timeout=60
            ).status_code
        )
    )
    try:
        request.start()
        time.sleep(0.8)  # the request is being scored (2 s)
        process.send_signal(signal.SIGTERM)
        request.join(timeout=60)
        # uvicorn drains, then ends by the signal itself (exit status 143 in a shell)
        assert process.wait(timeout=60) == -signal.SIGTERM
    finally:
        process.kill()
    assert answers == [200]


def test_workers_serve_from_several_processes(tmp_path: Path) -> None:
    """serve workers=2: two worker processes, each with the model loaded, answer requests."""
    import httpx

    process, url = _serve(tmp_path, "workers=2")
    try:
        pids = set()
        for _ in range(60):  # a new connection each time: the kernel hands them to either worker
            pids.add(httpx.get(f"{url}/health", timeout=10).json()["worker_pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2 and process.pid not in pids
    finally:
        process.terminate()
        process.wait(timeout=60)

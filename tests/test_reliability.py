"""Reliability: bad input is skipped or refused with one clear line, and crashes, kills and full
disks lose nothing a user made."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image

from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.training.interrupt import SaveOnInterrupt
from railway_defect.training.run import run_training
from railway_defect.utils.errors import UserError
from tests.helpers import (
    FAST,
    OFFLINE_ENV,
    PROJECT_ROOT,
    make_split_dataset,
    run_cli,
    save_half_then_fail,
    write_image,
)

# ---- bad data -----------------------------------------------------------------------------------


def setup_datamodule(root: Path, **kwargs) -> RailwayDataModule:
    dm = RailwayDataModule.from_settings(
        root=root, image_size=32, cache_size=40, batch_size=4, num_workers=0, **kwargs
    )
    dm.setup("fit")
    return dm


def test_a_1x1_image_trains_like_any_other(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 2, "Validation": 1})
    write_image(root / "Train" / "Defective" / "dot.png", size=(1, 1))
    dm = setup_datamodule(root)
    images = [dm._dataset("train", dm.train_transform)[i][0] for i in range(5)]
    assert all(image.shape == (3, 32, 32) for image in images)


def test_a_decompression_bomb_is_skipped_with_a_clear_reason(tmp_path: Path, caplog) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 2, "Validation": 1})
    Image.new("1", (12000, 9000)).save(root / "Train" / "Defective" / "huge.png")
    with caplog.at_level(logging.WARNING):
        dm = setup_datamodule(root)
    (skipped,) = dm.report["skipped"]
    assert skipped["path"].endswith("huge.png")
    assert "12000x9000" in skipped["reason"] and "data.max_pixels" in skipped["reason"]
    assert sum("huge.png" in r.getMessage() for r in caplog.records) == 1


def test_an_unreadable_file_is_skipped(tmp_path: Path, monkeypatch) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 2, "Validation": 1})
    locked = root / "Train" / "Defective" / "Train_0.jpg"
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:  # chmod 000 does not stop root, so simulate EACCES
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    dm = setup_datamodule(root)
    assert [Path(s["path"]) for s in dm.report["skipped"]] == [locked]
    assert "Permission denied" in dm.report["skipped"][0]["reason"]


def test_symlink_loops_and_broken_links_do_not_hang_or_crash(tmp_path: Path) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 2, "Validation": 1})
    (root / "Train" / "Defective" / "loop").symlink_to(root / "Train")
    (root / "Train" / "Defective" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    dm = setup_datamodule(root)
    assert dm.report["counts"]["train"] == {"Defective": 2, "Non defective": 2}
    assert [Path(s["path"]).name for s in dm.report["skipped"]] == ["gone.jpg"]


def test_unicode_and_spaces_in_class_names(tmp_path: Path) -> None:
    classes = ("Défaut de soudure", "Non défectueux ✓")
    root = make_split_dataset(tmp_path / "d", {"Train": 2, "Validation": 1}, classes=classes)
    dm = setup_datamodule(root, positive_class="Défaut de soudure")
    assert dm.classes == sorted(classes)


def test_an_empty_class_folder_is_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 2, "Validation": 1})
    (root / "Train" / "Cracked").mkdir()
    with caplog.at_level(logging.WARNING):
        dm = setup_datamodule(root)
    assert dm.classes == ["Defective", "Non defective"]
    assert any("Cracked" in r.getMessage() and "no images" in r.getMessage() for r in caplog.records)


def test_a_manifest_label_without_training_images_is_refused(tmp_path: Path) -> None:
    rows = ["path,label,split"]
    for i in range(6):
        write_image(tmp_path / f"{i}.png", label_index=i % 2, seed=i)
        rows.append(f"{i}.png,{('Defective', 'Non defective')[i % 2]},{'train' if i < 4 else 'val'}")
    write_image(tmp_path / "cracked.png", seed=9)
    rows.append("cracked.png,Cracked,val")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"\['Cracked'\] have no training images"):
        setup_datamodule(tmp_path)


def test_identical_files_across_splits_are_reported_as_leakage(tmp_path: Path, caplog) -> None:
    root = make_split_dataset(tmp_path / "d", {"Train": 2, "Validation": 1})
    (root / "Validation" / "Defective" / "copy.jpg").write_bytes(
        (root / "Train" / "Defective" / "Train_0.jpg").read_bytes()
    )
    with caplog.at_level(logging.WARNING):
        dm = setup_datamodule(root)
    (pair,) = dm.report["duplicates_across_splits"]
    assert {entry["split"] for entry in pair} == {"train", "val"}
    assert any("leakage" in r.getMessage() for r in caplog.records)


# ---- bad configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1 must be positive"),
        ("data.batch_size=0", "data.batch_size=0 must be at least 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 trains nothing"),
        ("ckpt_path=nowhere.ckpt", "ckpt_path=nowhere.ckpt does not exist"),
        ("ckpt_path=last", "ckpt_path=last: no last.ckpt"),
        ("callbacks.model_checkpoint.monitor=val/los", "monitor=val/los is not a metric to maximise"),
        pytest.param(
            "trainer.accelerator=gpu",
            "needs a CUDA GPU, and torch sees none",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_config_mistakes_fail_before_any_heavy_work(
    compose_train, tiny_dataset: Path, tmp_path, override, message
) -> None:
    cfg = compose_train(*FAST, f"data.root={tiny_dataset}", f"paths.output_root={tmp_path}/outputs", override)
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        run_training(cfg)


def test_a_checkpoint_of_another_backbone_or_classes_is_refused(
    compose_train, tiny_dataset: Path, tmp_path
) -> None:
    cfg = compose_train(*FAST, f"data.root={tiny_dataset}", "trainer.max_epochs=1")
    run_training(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="trained with model=resnet18, this run uses model=resnet34"):
        run_training(compose_train(*FAST, f"data.root={tiny_dataset}", "model=resnet34", f"ckpt_path={last}"))
    other = make_split_dataset(
        tmp_path / "other", {"Train": 2, "Validation": 1}, classes=("Crack", "Defective", "Ok")
    )
    with pytest.raises(UserError, match="trained on classes"):
        run_training(compose_train(*FAST, f"data.root={other}", f"ckpt_path={last}"))


def test_cli_config_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = run_cli("railway_defect.train", "optimizer.lr=-1", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: optimizer.lr=-1 must be positive (e.g. optimizer.lr=0.001)."
    )
    assert "Traceback" not in result.stderr


def test_unwritable_output_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli("railway_defect.train", f"hydra.run.dir={blocker}/run")
    assert result.returncode == 1
    assert "error: cannot write the output directory" in result.stderr
    assert "is a file, not a directory" in result.stderr and "Traceback" not in result.stderr


# ---- interruptions and full disks ---------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoints(
    compose_train, tiny_dataset, monkeypatch
) -> None:
    cfg = compose_train(*FAST, f"data.root={tiny_dataset}", "trainer.max_epochs=1")
    run_training(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    before = {name: sha256(checkpoints / name) for name in ("best.ckpt", "last.ckpt")}

    monkeypatch.setattr(torch, "save", save_half_then_fail(torch.save))
    resumed = compose_train(*FAST, f"data.root={tiny_dataset}", "trainer.max_epochs=3", "ckpt_path=last")
    with pytest.raises(OSError, match="No space left"):
        run_training(resumed)
    monkeypatch.undo()

    assert {name: sha256(checkpoints / name) for name in before} == before
    assert "state_dict" in torch.load(checkpoints / "last.ckpt", weights_only=False)  # still loads
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]  # no half-written files
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "No space left" in metrics["error"]


def _spawn(command: list[str], log: Path) -> subprocess.Popen:
    """The command in a child process whose output goes to `log`, not to a pipe: a pipe nobody
    reads while the test waits fills up and blocks the child."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        return subprocess.Popen(
            command, cwd=PROJECT_ROOT, env={**os.environ, **OFFLINE_ENV}, stdout=out, stderr=subprocess.STDOUT
        )


def _log_of(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".log")


def _train_process(run_dir: Path, data: Path, *extra: str) -> subprocess.Popen:
    """Training into `run_dir`, its output in `<run_dir>.log`."""
    args = [
        *FAST,
        f"data.root={data}",
        f"hydra.run.dir={run_dir}",
        "trainer.max_epochs=5",
        "trainer.deterministic=true",
    ]
    return _spawn([sys.executable, "-m", "railway_defect.train", *args, *extra], _log_of(run_dir))


def _wait_for_checkpoints(
    last: Path, count: int, process: subprocess.Popen, timeout: float = 240
) -> list[float]:
    """Block until last.ckpt (in <run>/checkpoints/) has been written `count` times (once per
    finished epoch); when each write was seen (time.monotonic)."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        assert process.poll() is None, _log_of(last.parent.parent).read_text()
        assert time.monotonic() < deadline, "training did not progress"
        if last.is_file():
            seen.setdefault(last.stat().st_mtime_ns, time.monotonic())
        time.sleep(0.005)
    return sorted(seen.values())


@pytest.fixture
def slower_dataset(tmp_path: Path) -> Path:
    """Enough images that an epoch takes a noticeable time, so a signal lands mid-run."""
    return make_split_dataset(tmp_path / "data", {"Train": 24, "Validation": 4})


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_result(tmp_path: Path, slower_dataset: Path) -> None:
    reference = _train_process(tmp_path / "reference", slower_dataset)
    assert reference.wait(timeout=600) == 0, _log_of(tmp_path / "reference").read_text()

    killed = _train_process(tmp_path / "killed", slower_dataset)
    _wait_for_checkpoints(tmp_path / "killed" / "checkpoints" / "last.ckpt", 2, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["status"] == "running"
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] < 5

    resumed = _train_process(tmp_path / "killed", slower_dataset, "ckpt_path=last")
    assert resumed.wait(timeout=600) == 0, _log_of(tmp_path / "killed").read_text()
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    actual = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert actual["status"] == "finished"
    assert actual["epochs_completed"] == 5
    assert [row["epoch"] for row in actual["history"]] == [0, 1, 2, 3, 4]
    for got, want in zip(actual["history"], expected["history"], strict=True):
        assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_last_ckpt_and_says_how_to_resume(
    tmp_path: Path, slower_dataset: Path, signum
) -> None:
    process = _train_process(tmp_path / "run", slower_dataset, "trainer.max_epochs=50")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    seen = _wait_for_checkpoints(last, 2, process)
    first_step = torch.load(last, weights_only=False)["global_step"]
    time.sleep((seen[1] - seen[0]) / 2)  # half an epoch, however busy the machine: into the next one
    process.send_signal(signum)
    process.wait(timeout=120)
    output = _log_of(tmp_path / "run").read_text()
    assert process.returncode != 0
    assert "Resume with" in output and f"ckpt_path={last}" in output
    assert torch.load(last, weights_only=False)["global_step"] > first_step
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "interrupted"


def _sweep_command(sweep: Path, data: Path, epochs: int) -> list[str]:
    """Three seeds, two at a time in joblib's worker processes, with the default callbacks."""
    overrides = (
        "model=resnet18",
        "model.pretrained=false",
        "data.image_size=64",
        "data.cache_size=72",
        "data.batch_size=4",
        "trainer.accelerator=cpu",
        f"trainer.max_epochs={epochs}",
        f"data.root={data}",
        "seed=1,2,3",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
    )
    return [sys.executable, "-m", "railway_defect.train", "-m", *overrides]


@pytest.mark.slow
def test_sigterm_stops_a_joblib_sweep_whose_jobs_then_resume(tmp_path: Path, slower_dataset: Path) -> None:
    """SIGTERM to a sweep whose jobs run in joblib's workers (what `kill` or a scheduler sends)
    stops the running jobs with last.ckpt saved, instead of leaving them training, orphaned; the same
    command plus ckpt_path=last continues each job from its own last.ckpt and starts a job that never
    ran from the beginning, never from another job's checkpoint."""
    sweep, epochs = tmp_path / "sweep", 8
    command = _sweep_command(sweep, slower_dataset, epochs)
    log = _log_of(sweep)
    process = _spawn(command, log)
    deadline = time.monotonic() + 240
    while len(list(sweep.glob("*/checkpoints/last.ckpt"))) < 2:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the sweep's jobs did not start training"
        time.sleep(0.05)
    workers = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=180)
    output = log.read_text()
    assert process.returncode == 128 + signal.SIGTERM, output
    assert f"ckpt_path=last hydra.sweep.dir={sweep}" in output
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    stopped = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert {job: m["status"] for job, m in stopped.items()} == {"0": "interrupted", "1": "interrupted"}

    resumed = _spawn([*command, "ckpt_path=last"], log)
    assert resumed.wait(timeout=600) == 0, log.read_text()
    for job in ("0", "1", "2"):
        record = json.loads((sweep / job / "metrics.json").read_text())
        assert record["status"] == "finished"
        assert [row["epoch"] for row in record["history"]] == list(range(epochs))
        own = str(sweep / job / "checkpoints" / "last.ckpt")
        assert record["resumed_from"] == (None if job == "2" else own)


def test_a_ctrl_c_that_python_drops_is_raised_at_the_next_batch() -> None:
    """CPython ignores an exception raised while a file object is finalised; a Ctrl-C landing then
    (e.g. during a checkpoint write) must still stop the run at the next batch."""
    callback = SaveOnInterrupt()

    class FinalisedDuringCtrlC(io.RawIOBase):
        @property
        def closed(self) -> bool:
            callback._on_sigint(signal.SIGINT, None)  # what the SIGINT handler does
            return True

    callback.on_train_batch_end(None, None, None, None, 0)  # nothing pressed yet: nothing raised
    file = FinalisedDuringCtrlC()
    del file  # the KeyboardInterrupt is dropped here, not raised
    with pytest.raises(KeyboardInterrupt):
        callback.on_train_batch_end(None, None, None, None, 0)


# ---- long runs --------------------------------------------------------------------------------


class RecordRss(Callback):
    """Appends this process's resident memory (MB) to `path` after every training epoch."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        with open("/proc/self/statm") as f:
            rss_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        with self.path.open("a") as f:
            f.write(f"{rss_mb}\n")


def test_memory_stays_flat_over_many_epochs(compose_train, tiny_dataset: Path, tmp_path: Path) -> None:
    log = tmp_path / "rss.txt"
    cfg = compose_train(
        *FAST,
        f"data.root={tiny_dataset}",
        "trainer.max_epochs=12",
        "+callbacks.rss._target_=tests.test_reliability.RecordRss",
        f"+callbacks.rss.path={log}",
    )
    run_training(cfg)
    samples = [float(line) for line in log.read_text().split()]
    assert len(samples) == 12
    growth = max(samples[4:]) - samples[3]
    assert growth < 40, f"RSS grew {growth:.0f} MB between epochs 4 and 12: {np.round(samples)}"


@pytest.mark.slow
def test_predict_memory_stays_flat_over_thousands_of_files(
    compose_train, tiny_dataset: Path, tmp_path: Path
) -> None:
    """Predict streams: scoring 10x more files must not raise the peak memory noticeably (holding
    the 2000 decoded inputs, or their tensors, would cost ~100 MB)."""
    import resource

    from railway_defect.inference.predicting import run_prediction

    cfg = compose_train(*FAST, f"data.root={tiny_dataset}", "trainer.max_epochs=1", "test=false")
    run_training(cfg)
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    rng = np.random.default_rng(0)
    (tmp_path / "large").mkdir()
    (tmp_path / "small").mkdir()
    for i in range(2000):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
            tmp_path / "large" / f"{i}.png"
        )
    for i in range(200):  # the first 200 of the same files
        (tmp_path / "small" / f"{i}.png").hardlink_to(tmp_path / "large" / f"{i}.png")

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    run_prediction(str(checkpoint), str(tmp_path / "small"), tmp_path / "small.csv", progress=False)
    warm = peak_mb()
    run_prediction(str(checkpoint), str(tmp_path / "large"), tmp_path / "large.csv", progress=False)
    assert len((tmp_path / "large.csv").read_text().splitlines()) == 2001
    assert peak_mb() - warm < 40, f"peak RSS grew from {warm:.0f} MB to {peak_mb():.0f} MB"


@pytest.mark.parametrize("resumed", [False, True], ids=["first checkpoint", "after a resume"])
def test_a_disk_that_fills_while_a_checkpoint_is_written_ends_in_one_line(
    tmp_path: Path, tiny_dataset: Path, resumed: bool
) -> None:
    """torch.save on a full disk fails in its C++ writer (a RuntimeError, the OSError only its
    context): the run still ends with the one `error:` line naming the file, the free space and
    the way out, records why, and leaves the checkpoints already written as they were."""
    run = tmp_path / "run"
    args = [*FAST, f"data.root={tiny_dataset}", f"hydra.run.dir={run}"]
    before = {}
    if resumed:
        assert run_cli("railway_defect.train", *args, "trainer.max_epochs=1").returncode == 0
        before = {p.name: sha256(p) for p in (run / "checkpoints").glob("*.ckpt")}
    code = (
        "import sys, torch; from tests.helpers import save_into_a_full_disk; "
        "torch.save = save_into_a_full_disk(torch.save); from railway_defect.train import cli; "
        "sys.argv = ['railway-train', *sys.argv[1:]]; cli()"
    )
    extra = ["trainer.max_epochs=2", *(["ckpt_path=last"] if resumed else [])]
    result = subprocess.run(
        [sys.executable, "-c", code, *args, *extra],
        cwd=PROJECT_ROOT,
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {run / 'checkpoints'}") and "No space left on device" in last
    assert "MB free" in last and "hydra.run.dir" in last and "Traceback" not in result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "No space left on device" in metrics["error"]
    assert {p.name: sha256(p) for p in (run / "checkpoints").glob("*.ckpt")} == before


def test_a_disk_that_fills_while_metrics_json_is_written_ends_in_one_line(
    compose_train, tiny_dataset: Path, monkeypatch
) -> None:
    """The run record is the last thing a run writes: a full disk then is the same one line, and
    the checkpoints the run wrote stay whole."""
    from railway_defect.train import TRAIN_DISK_HINT
    from railway_defect.training import record
    from railway_defect.utils.commands import run_command

    def full_disk(path: Path, data: object) -> None:
        if json.loads(json.dumps(data, default=str)).get("status") in ("finished", "failed"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    cfg = compose_train(*FAST, f"data.root={tiny_dataset}", "trainer.max_epochs=1")
    monkeypatch.setattr(record, "write_json_atomic", full_disk)
    with pytest.raises(SystemExit) as stopped:
        run_command(lambda: run_training(cfg), TRAIN_DISK_HINT)
    message = str(stopped.value)
    assert message.startswith(
        f"error: cannot write {Path(cfg.paths.output_dir) / 'metrics.json'}: No space left"
    )
    assert "MB free" in message and "hydra.run.dir" in message and "\n" not in message
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert all("state_dict" in torch.load(p, weights_only=False) for p in checkpoints.glob("*.ckpt"))

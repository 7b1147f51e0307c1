"""trainer=ddp_cpu: two processes (gloo) train one model with the default callbacks and loggers;
the validation metrics are gathered from both processes (so they equal a single-process
validation of the checkpoint), and rank 0 alone writes the checkpoint, metrics.json and
TensorBoard logs. A process that stops taking part fails the run within the DDP timeout, and
SIGTERM ends a run whose main process waits in a collective.

Every run goes through `run_bounded`: a hang fails the test (and kills both ranks) instead of
blocking CI."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from railway_defect.data.datamodule import RailwayDataModule
from railway_defect.models.module import DefectClassifier
from railway_defect.utils.paths import PROJECT_ROOT
from tests.helpers import CONF_DIR, OFFLINE_ENV, REAL_DATA, VAL_METRICS

# the sample data: 79 training images (40 per process, one of them padded) and 28 validation images
TINY_DDP = (
    "railway_defect.train",
    "trainer=ddp_cpu",
    "model=resnet18",
    "model.pretrained=false",
    "data.image_size=32",
    "data.cache_size=40",
    "data.batch_size=8",
)
needs_data = pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason="the shared sample data set is not beside the project"
)


def _start(log_dir: Path, *args: str) -> subprocess.Popen:
    """In its own process group, so that both ranks can be killed together; output to files, as
    pipes would stay open as long as any rank lives."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "w") as stdout, open(log_dir / "stderr.txt", "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=stdout,
            stderr=stderr,
            cwd=PROJECT_ROOT,
            env={**os.environ, **OFFLINE_ENV},
            start_new_session=True,
        )


def _stderr(log_dir: Path) -> str:
    return (log_dir / "stderr.txt").read_text()


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """A running (not zombie: orphans may never be reaped here) process of group `pgid`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _group_alive_for(pgid: int, seconds: float) -> bool:
    """Whether a process of the group is still there after `seconds` (time to be reaped)."""
    deadline = time.monotonic() + seconds
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.5)
    return _group_alive(pgid)


def run_bounded(*args: str, log_dir: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """run_cli, except that a run still going after `timeout` seconds (a hang) fails the test."""
    proc = _start(log_dir, *args)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run hung (killed after {timeout} s):\n{_stderr(log_dir)[-3000:]}")
    finally:
        _kill_group(proc)  # a rank left behind
    stdout = (log_dir / "stdout.txt").read_text()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, _stderr(log_dir))


@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu"])
def test_ddp_trainers_bound_the_wait_in_a_collective(trainer: str) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        default = compose(config_name="train", overrides=[f"trainer={trainer}"])
        changed = compose(
            config_name="train", overrides=[f"trainer={trainer}", "trainer.strategy.timeout.seconds=42"]
        )
    assert instantiate(default.trainer.strategy)._timeout == timedelta(minutes=10)
    strategy = instantiate(changed.trainer.strategy)
    assert isinstance(strategy, DDPStrategy) and strategy._timeout == timedelta(seconds=42)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("decode", ["auto", "gpu"])  # auto: the CPU path on a CPU trainer
def test_ddp_cpu_metrics_equal_a_single_process_validation_of_the_checkpoint(
    tmp_path: Path, decode: str
) -> None:
    """Also with data.decode=gpu: each rank makes its own shard's batches on its device (here the
    CPU), and one process validating the checkpoint the same way gets the same metrics."""
    result = run_bounded(
        *TINY_DDP,
        f"data.decode={decode}",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        f"hydra.run.dir={tmp_path}",
        log_dir=tmp_path / "logs",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["world_size"] == 2
    assert metrics["data"]["decode"] == {"auto": "cpu", "gpu": "gpu"}[decode]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) >= 1
    assert not list(tmp_path.glob("**/version_*"))  # no second logger directory from rank 1

    # each process validated 14 of the 28 images; the logged values cover all 28
    model = DefectClassifier.load_from_checkpoint(metrics["checkpoints"]["best"], pretrained=False)
    dm = RailwayDataModule.from_settings(
        root=REAL_DATA, image_size=32, cache_size=40, batch_size=8, num_workers=0, decode=decode
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (validated,) = trainer.validate(model, dm, verbose=False)
    assert metrics["data"]["counts"]["val"] == {"Defective": 19, "Non defective": 9}
    for name in VAL_METRICS:
        assert metrics["val"][name] == pytest.approx(validated[name], abs=1e-5), name


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize(
    ("overrides", "epochs", "validations"),
    [
        # the command of issue 12: 2 of the 5 batches per process, two epochs
        (("trainer.max_epochs=2", "+trainer.limit_train_batches=0.5"), 2, 2),
        # all 5 batches (an odd number; 79 images split 40 + 39, padded), validation every 2
        # batches on 1 batch per process
        (("trainer.max_epochs=1", "+trainer.val_check_interval=2", "+trainer.limit_val_batches=1"), 1, 2),
        # 3 batches per epoch, validation every second epoch only
        (
            ("trainer.max_epochs=2", "+trainer.limit_train_batches=3", "trainer.check_val_every_n_epoch=2"),
            2,
            1,
        ),
    ],
    ids=["half_of_the_batches", "val_check_interval", "val_every_2nd_epoch"],
)
def test_ddp_cpu_finishes_with_the_default_callbacks_and_loggers(
    tmp_path: Path, overrides: tuple[str, ...], epochs: int, validations: int
) -> None:
    """Rich progress bar and model summary, review images, divergence guard, learning-rate monitor
    and the rest: each issues the same collectives in the same order on both processes."""
    result = run_bounded(
        *TINY_DDP,
        *overrides,
        "logger=[tensorboard,csv]",
        f"hydra.run.dir={tmp_path}",
        log_dir=tmp_path / "logs",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["world_size"] == 2
    assert metrics["epochs_completed"] == epochs
    # the directory: the fit's event file, then the HParams summary's
    accumulator = EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0}
    ).Reload()
    tags = accumulator.Tags()
    assert len(accumulator.Scalars("val/balanced_acc")) == validations
    assert {"lr-AdamW", "train/loss", "train/acc", "val/balanced_acc"} <= set(tags["scalars"])
    assert {"train/augmented_batch", "val/predictions", "val/gradcam"} <= set(tags["images"])
    assert "train/acc" in (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]


def _run_with_a_stalled_rank(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    flag = tmp_path / "stalled"
    proc = _start(
        tmp_path / "logs",
        *TINY_DDP,
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "+callbacks.stall._target_=tests.stall.StallRank",
        f"+callbacks.stall.flag={flag}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    )
    return proc, flag


@pytest.mark.slow
@needs_data
def test_a_stalled_rank_fails_the_run_within_the_ddp_timeout(tmp_path: Path) -> None:
    """Without the timeout rank 0 would wait for rank 1's 300 s stall (and then for gloo's 30 min)."""
    proc, _ = _run_with_a_stalled_rank(tmp_path, "trainer.strategy.timeout.seconds=10")
    try:
        proc.wait(timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("a collective waited for the stalled process beyond trainer.strategy.timeout")
    finally:
        alive_after_exit = _group_alive_for(proc.pid, 10)
        _kill_group(proc)
    stderr = _stderr(tmp_path / "logs")
    assert proc.returncode != 0
    assert "timeout" in stderr.lower(), stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    assert not alive_after_exit, "the stalled rank outlived the failed run"


@pytest.mark.slow
@needs_data
def test_sigterm_ends_a_run_that_waits_in_a_collective(tmp_path: Path) -> None:
    """Rank 0 waits for the stalled rank 1 inside gloo, where Python signal handlers (Lightning's
    SIGTERM handling) never run; the watchdog ends both after `shutdown_grace_s`."""
    proc, flag = _run_with_a_stalled_rank(tmp_path, "shutdown_grace_s=5")
    try:
        deadline = time.monotonic() + 150
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert flag.exists(), "the run never reached its first training batch"
        time.sleep(3)  # rank 0 is in the next collective by now
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM did not end a run waiting in a collective")
        assert time.monotonic() - sent < 60
        assert proc.returncode == 128 + signal.SIGTERM
        assert not _group_alive_for(proc.pid, 10), "rank 1 outlived the run"
    finally:
        _kill_group(proc)


def _summary_rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@needs_data
def test_ddp_cpu_inside_a_sweep_spawns_its_processes(tmp_path: Path) -> None:
    """lightning-hydra-template's test_hydra_sweep_ddp_sim, with the default callbacks: each job's
    two ranks are spawned (re-running the command line would re-run the sweep), rank 0's results
    come back to the job's process, and the summary and out-of-fold files are whole."""
    sweep = tmp_path / "sweep"
    result = run_bounded(
        *TINY_DDP[:1],
        "-m",
        *TINY_DDP[1:],
        "optimizer.lr=0.005,0.01",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        f"hydra.sweep.dir={sweep}",
        log_dir=tmp_path / "logs",
        timeout=480,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _summary_rows(sweep)
    assert sorted(r["job"] for r in rows) == ["0", "1"] and {r["status"] for r in rows} == {"ok"}
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["status"] == "finished" and metrics["world_size"] == 2
        assert metrics["epochs_completed"] == 1 and len(metrics["history"]) == 1
        assert metrics["best"]["epoch"] == 0 and metrics["val"]["val/f1"] == metrics["history"][0]["val/f1"]
        assert sorted(p.name for p in (sweep / job / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
        assert "`Trainer.fit` stopped" in (sweep / job / "train.log").read_text()  # rank 0's log lines
    assert not list(sweep.glob("**/version_*"))

    # both ranks' scores, gathered in the validation split's order, from the final weights
    with open(sweep / "0" / "predictions_val.csv", newline="") as f:
        predicted = list(csv.DictReader(f))
    model = DefectClassifier.load_from_checkpoint(sweep / "0" / "checkpoints" / "last.ckpt", pretrained=False)
    dm = RailwayDataModule.from_settings(
        root=REAL_DATA, image_size=32, cache_size=40, batch_size=8, num_workers=0
    )
    dm.setup("fit")
    assert [r["path"] for r in predicted] == [str(s.path) for s in dm.splits["val"]]
    model.eval()
    with torch.no_grad():
        probabilities = torch.cat(
            [model(x).softmax(-1)[:, model.positive_index] for x, _ in dm.val_dataloader()]
        )
    column = f"p_{model.contract.positive_class}"
    assert [float(r[column]) for r in predicted] == pytest.approx(probabilities.tolist(), abs=1e-4)


@pytest.mark.slow
def test_optuna_search_with_ddp_cpu_trials(tmp_path: Path, tiny_dataset: Path) -> None:
    import optuna

    sweep = tmp_path / "study"
    result = run_bounded(
        "railway_defect.train",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        *TINY_DDP[1:],
        "trainer.max_epochs=1",
        "test=false",
        f"data.root={tiny_dataset}",
        f"hydra.sweep.dir={sweep}",
        log_dir=tmp_path / "logs",
        timeout=480,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="railway_defect", storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    rows = _summary_rows(sweep)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    for job in ("0", "1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["world_size"] == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_nodes(tmp_path: Path, train: list[str], torchrun: list[str], timeout: float) -> None:
    """Two torchrun nodes on 127.0.0.1, one process each, running `train`; both must exit 0 within
    `timeout` seconds (a hang fails the test and kills them)."""
    nodes = [
        _start(
            tmp_path / f"node{rank}",
            "torch.distributed.run",
            "--nnodes=2",
            f"--node_rank={rank}",
            "--nproc_per_node=1",
            *torchrun,
            "-m",
            "railway_defect.train",
            *train,
        )
        for rank in (0, 1)
    ]
    try:
        for rank, node in enumerate(nodes):
            assert node.wait(timeout=timeout) == 0, _stderr(tmp_path / f"node{rank}")[-3000:]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two nodes hung:\n{_stderr(tmp_path / 'node0')[-3000:]}")
    finally:
        for node in nodes:
            _kill_group(node)


@pytest.mark.slow
@needs_data
def test_two_torchrun_nodes_train_one_run_with_the_default_callbacks(tmp_path: Path) -> None:
    """Two machines as torchrun starts them (here two nodes on 127.0.0.1, gloo, one process each):
    `trainer=ddp_cpu trainer.num_nodes=2` trains one run with the default callbacks; rank 0 alone
    writes metrics.json and the checkpoints, and the validation metrics cover both nodes' images
    (equal to a single-process validation of the checkpoint)."""
    run, port = tmp_path / "run", _free_port()
    train = [*TINY_DDP[1:], "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=1"]
    train += ["+trainer.limit_train_batches=2", f"hydra.run.dir={run}"]
    _run_two_nodes(tmp_path, train, ["--master_addr=127.0.0.1", f"--master_port={port}"], timeout=300)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["world_size"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    model = DefectClassifier.load_from_checkpoint(metrics["checkpoints"]["best"], pretrained=False)
    dm = RailwayDataModule.from_settings(
        root=REAL_DATA, image_size=32, cache_size=40, batch_size=8, num_workers=0
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (validated,) = trainer.validate(model, dm, verbose=False)
    for name in VAL_METRICS:
        assert metrics["val"][name] == pytest.approx(validated[name], abs=1e-5), name


@pytest.mark.slow
@needs_data
def test_a_node_killed_mid_epoch_is_restarted_and_the_run_resumes_from_last_ckpt(tmp_path: Path) -> None:
    """torchrun --max-restarts=1 on both nodes (c10d rendezvous): node 1's process is killed (SIGKILL)
    in the middle of epoch 1; its agent starts it again, node 0's agent restarts its own for the new
    rendezvous round, and both continue, on process-group keys of their own start (join_torchrun_job),
    from the last.ckpt of epoch 0 (elastic_restart_checkpoint) to the end, in one run directory."""
    run, port, flag = tmp_path / "run", _free_port(), tmp_path / "killed"
    train = [*TINY_DDP[1:], "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=3"]
    train += ["+trainer.limit_train_batches=3", "trainer.strategy.timeout.seconds=60", f"hydra.run.dir={run}"]
    train += ["+callbacks.kill._target_=tests.stall.KillRank", f"+callbacks.kill.flag={flag}"]
    # c10d: a new rendezvous round for the restart (the static rendezvous keeps the old peers)
    rendezvous = ["--max-restarts=1", "--monitor-interval=1", "--rdzv-backend=c10d"]
    rendezvous += [f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=killed-node"]
    _run_two_nodes(tmp_path, train, rendezvous, timeout=400)
    assert flag.exists(), "node 1 was never killed"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["world_size"] == 2
    assert metrics["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert metrics["epochs_completed"] == 3
    log = (run / "train.log").read_text()
    assert log.count("torchrun job killed-node restarted: resuming from") == 2, log[-3000:]
    assert log.count("torchrun job killed-node: start 2 (2 processes)") == 2

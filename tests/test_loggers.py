"""Runs without a logger (`logger=[]`, `logger=null`) and with several (`logger=[tensorboard,csv]`):
the callbacks that only write to a logger are left out, said once, instead of failing the run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from railway_defect.train import accept_logger_null
from railway_defect.training.run import run_training
from tests.helpers import FAST, run_cli

# FAST, but with the callbacks that need a logger: the learning-rate monitor and review images
WITH_LOGGER_CALLBACKS = (*(o for o in FAST if not o.startswith("callbacks.review")), "trainer.max_epochs=1")
SKIPPED = "No logger in this run: skipping LearningRateMonitor, ReviewImages, HParams."


def test_logger_empty_list_trains_without_logging(
    compose_train, tiny_dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose_train(*WITH_LOGGER_CALLBACKS, f"data.root={tiny_dataset}", "logger=[]")
    assert "logger" not in cfg
    caplog.set_level(logging.INFO, logger="railway_defect.training.run")
    run_training(cfg)
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["tensorboard_dir"] is None
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "csv").exists()
    assert [r.getMessage() for r in caplog.records].count(SKIPPED) == 1


def test_two_loggers_both_get_the_metrics(compose_train, tiny_dataset: Path) -> None:
    cfg = compose_train(*WITH_LOGGER_CALLBACKS, f"data.root={tiny_dataset}", "logger=[tensorboard,csv]")
    assert sorted(cfg.logger) == ["csv", "tensorboard"]
    run_training(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"lr-AdamW", "train/loss", "val/balanced_acc"} <= set(header)


def test_logger_null_on_the_command_line_means_no_logger(tiny_dataset: Path, tmp_path: Path) -> None:
    assert accept_logger_null(["train", "logger=null", "x=null"]) == ["train", "logger=[]", "x=null"]
    result = run_cli(
        "railway_defect.train",
        *WITH_LOGGER_CALLBACKS,
        f"data.root={tiny_dataset}",
        "logger=null",
        f"hydra.run.dir={tmp_path}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "finished"
    assert SKIPPED in (tmp_path / "train.log").read_text()
    assert not (tmp_path / "tensorboard").exists()

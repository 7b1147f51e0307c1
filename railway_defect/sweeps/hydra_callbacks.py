"""Hydra callbacks (registered in conf/hydra/default.yaml): a check that must run before Hydra
creates the run directory, the sweep summary kept current after every job, and SIGTERM reaching
the jobs of a sweep that runs them in joblib's worker processes."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from railway_defect.data.discovery import TRAIN_AND_VAL, check_nested_groups, check_train_on
from railway_defect.data.labels import read_labels
from railway_defect.training.shutdown import stop_workers
from railway_defect.utils.commands import command_failure
from railway_defect.utils.errors import UserError

log = logging.getLogger(__name__)


def _unwritable_reason(directory: Path) -> str | None:
    """Why `directory` cannot be created and written, or None; creates nothing."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


class OutputDirCheck(Callback):
    """An unwritable run/sweep directory is a one-line error instead of a traceback from Hydra."""

    def _check(self, directory: str, key: str) -> None:
        reason = _unwritable_reason(Path(directory).expanduser().absolute())
        if reason:
            raise command_failure(f"cannot write the output directory {directory}: {reason}; set {key}=DIR.")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")


class SweepPlanCheck(Callback):
    """A sweep that cannot give what it promises stops before its first job, with one line, instead
    of failing or returning NaN once per job: a nested CV whose folds cannot all hold each class, a
    cross-validation of a train_and_val recipe, and a sweep whose jobs validate nothing but whose
    optimized_metric is a validation metric."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        data = config.get("data") or {}
        try:
            check_train_on(str(data.get("train_on", "train")), data.get("num_folds"))
            _check_optimized_metric(data, OmegaConf.select(config, "optimized_metric"))
            _check_nested_groups(data)
        except UserError as e:
            raise command_failure(str(e)) from None


def _check_optimized_metric(data: DictConfig, metric: str | None) -> None:
    """With data.train_on=train_and_val no job validates: a sweeper has nothing to compare on."""
    if data.get("train_on") != TRAIN_AND_VAL or str(metric or "").startswith("train/"):
        return
    raise UserError(
        f"data.train_on={TRAIN_AND_VAL} validates nothing, so no job of this sweep can return "
        f"optimized_metric={metric}; compare recipes by cross-validation (experiment=cv or "
        "experiment=nested_cv, which train on the folds), or sweep on a training metric "
        "(optimized_metric=train/acc)."
    )


def _check_nested_groups(data: DictConfig) -> None:
    if not data.get("outer_folds") or not data.get("num_folds"):
        return
    seed = data.get("split_seed") if data.get("split_seed") is not None else data.get("seed", 42)
    root = Path(str(data.root)).expanduser()
    check_nested_groups(
        root,
        int(data.outer_folds),
        int(data.num_folds),
        int(seed),
        data.get("group_window_s", 10),
        data.get("test_fraction"),
        read_labels(str(data.labels), root) if data.get("labels") else None,
    )


def _summarize(sweep_dir: Path, metric: str | None, show: bool = True) -> Any:
    """The sweep's summary. Imported here, not above: these callbacks run in every command, and
    sweeps.summary imports Lightning, which a serving process need not carry (~100 MB)."""
    from railway_defect.sweeps.summary import summarize_and_write

    return summarize_and_write(sweep_dir, metric, show=show)


def _sweep_dir(config: DictConfig) -> Path | None:
    if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
        return None
    return Path(str(config.hydra.sweep.dir))


class SweepSummary(Callback):
    """Keeps a sweep's summary up to date after every job and prints it when the sweep ends; the
    sweep then exits non-zero when any job did not finish ok, since failed jobs themselves no
    longer stop the sweep (see train.py)."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Rewrite the tables after each job, so an interrupted sweep still has a current summary."""
        sweep_dir = _sweep_dir(config)
        if sweep_dir is not None and sweep_dir.is_dir():
            try:
                _summarize(sweep_dir, OmegaConf.select(config, "optimized_metric"), show=False)
            except UserError as e:
                log.warning("No sweep summary: %s", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _sweep_dir(config)
        if sweep_dir is None or not sweep_dir.is_dir():
            return
        summary = _summarize(sweep_dir, OmegaConf.select(config, "optimized_metric"))
        if summary.not_ok:
            jobs = ", ".join(f"{row.job} ({row.status})" for row in summary.not_ok)
            raise command_failure(
                f"{len(summary.not_ok)} of {len(summary.rows)} jobs did not finish ok: {jobs}; "
                f"see {sweep_dir / 'summary.md'}"
            )


class StopJobsOnSigterm(Callback):
    """SIGTERM to a sweep whose jobs run in joblib's worker processes (`hydra/launcher=joblib`)
    stops those jobs too. Without this the sweep process dies at once and its workers train on,
    orphaned, with every job recorded as running. Each worker gets SIGTERM: a job in training stops
    at the next batch with last.ckpt saved and ends its worker (train.py); the sweep waits up to
    `shutdown_grace_s`, kills what is left, updates the summary, says how to resume and exits 143."""

    def __init__(self) -> None:
        self.previous_handler: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        if "joblib" not in launcher or threading.current_thread() is not threading.main_thread():
            return
        grace_s = float(OmegaConf.select(config, "shutdown_grace_s", default=60))
        sweep_dir = Path(str(config.hydra.sweep.dir))
        metric = OmegaConf.select(config, "optimized_metric")

        def stop(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the wait short
            stop_workers(grace_s)
            with contextlib.suppress(UserError, OSError):
                _summarize(sweep_dir, metric, show=False)
            log.warning(
                "SIGTERM: the sweep stopped; its interrupted jobs saved last.ckpt. Continue it with the "
                "same command plus ckpt_path=last hydra.sweep.dir=%s (each job resumes from its own).",
                sweep_dir,
            )
            raise SystemExit(128 + signal.SIGTERM)

        self.previous_handler = signal.signal(signal.SIGTERM, stop)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.previous_handler is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)
            self.previous_handler = None

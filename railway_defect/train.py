"""`python -m railway_defect.train`: train a defect classifier from the Hydra config in conf/."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

import railway_defect  # noqa: F401  (registers the config resolvers)
from railway_defect.data.discovery import REFIT, TRAIN_AND_VAL
from railway_defect.utils.commands import run_command
from railway_defect.utils.errors import user_message
from railway_defect.utils.layout import in_multirun
from railway_defect.utils.paths import CONFIG_DIR

log = logging.getLogger(__name__)
TRAIN_DISK_HINT = "free space or set hydra.run.dir to another disk (existing checkpoints are intact)"


def accept_logger_null(argv: list[str]) -> list[str]:
    """`logger=null` means no logger, as `logger=[]` does; Hydra refuses null for a config group
    (its own spelling is `~logger`), so it is rewritten before Hydra reads the command line."""
    return ["logger=[]" if arg == "logger=null" else arg for arg in argv]


def run_sweep_job(cfg: DictConfig, run_training: Callable[[DictConfig], float | None]) -> float:
    """In a sweep a failing job must not stop the others: its metrics.json records why and it
    returns NaN; the sweep summary (railway_defect.sweeps.hydra_callbacks) then makes the sweep
    exit non-zero."""
    try:
        value = run_training(cfg)
    except Exception as e:
        message = user_message(e, TRAIN_DISK_HINT)
        log.error("Job failed: %s", message) if message else log.exception("Job failed: %s", e)
        return math.nan
    if value is None:
        validates = cfg.data.get("fold") != REFIT and cfg.data.get("train_on") != TRAIN_AND_VAL
        report = log.warning if cfg.optimized_metric and validates else log.info
        report("optimized_metric=%s was not logged by this run; sweepers get NaN.", cfg.optimized_metric)
        return math.nan
    return value


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """A single run fails with a one-line error (or a traceback for a bug); a sweep job with NaN."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from railway_defect.training.run import run_training  # heavy imports only once the config is valid

    try:
        if in_multirun():
            return run_sweep_job(cfg, run_training)
        return run_command(lambda: run_training(cfg), TRAIN_DISK_HINT)
    except SIGTERMException:
        if multiprocessing.current_process().name != "MainProcess":
            # a launcher's worker (hydra/launcher=joblib): it ends, so the sweep that forwarded the
            # signal sees it stop (an exception would return to the worker, ready for the next job)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None  # stopped, not finished: never exit 0


def cli() -> None:
    """The `railway-train` command: the same command line as `python -m railway_defect.train`."""
    sys.argv = accept_logger_null(sys.argv)
    main()


if __name__ == "__main__":
    cli()

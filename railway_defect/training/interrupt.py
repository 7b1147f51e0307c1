"""SaveOnInterrupt: Ctrl-C or SIGTERM (a cluster pre-empting the job) saves last.ckpt before the
process stops, and says how to resume, so no finished step is lost.

Ctrl-C normally raises KeyboardInterrupt wherever the main thread is, but CPython drops an
exception raised while a file object is being finalised (it happens when the signal lands during
a checkpoint write), and the run would go on as if nothing was pressed. So the request is also
remembered, and raised again at the next batch or epoch boundary, the way Lightning treats
SIGTERM."""

from __future__ import annotations

import logging
import shlex
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from railway_defect.training.launching import SpawnLauncher

log = logging.getLogger(__name__)


def _resume_command(checkpoint: Path) -> str:
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    except ValueError:  # not started through @hydra.main
        pass
    return shlex.join(["python", "-m", "railway_defect.train", *overrides, f"ckpt_path={checkpoint}"])


class SaveOnInterrupt(Callback):
    def __init__(self) -> None:
        self.requested = False
        self._previous_handler: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) == self._on_sigint:
                signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def _raise_if_requested(self, *args: Any) -> None:
        """A Ctrl-C whose KeyboardInterrupt was lost is raised here, where Lightning handles it."""
        if self.requested:
            raise KeyboardInterrupt

    on_train_batch_end = on_validation_batch_end = on_train_epoch_end = on_validation_epoch_end = (
        _raise_if_requested
    )

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.sanity_checking:
            return
        launcher = trainer.strategy.launcher
        if isinstance(launcher, SpawnLauncher) and not launcher.in_worker:
            return  # the process that waits for spawned ranks holds no training state: they save it
        checkpoint_callback = trainer.checkpoint_callback
        if checkpoint_callback is None or not getattr(checkpoint_callback, "dirpath", None):
            return
        path = Path(checkpoint_callback.dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)  # atomic: a second Ctrl-C cannot leave half a file
        log.warning(
            "Interrupted at epoch %d, step %d: saved %s. Resume with:\n  %s",
            trainer.current_epoch,
            trainer.global_step,
            path,
            _resume_command(path),
        )

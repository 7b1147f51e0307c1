"""SaveOnInterrupt: Ctrl-C or SIGTERM (a cluster pre-empting the job) saves last.ckpt before the
process stops, and says how to resume, so no finished step is lost."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

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
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.sanity_checking:
            return
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

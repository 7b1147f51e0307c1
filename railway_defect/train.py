"""`python -m railway_defect.train`: train a defect classifier from the Hydra config in conf/."""

from __future__ import annotations

import errno
import logging
import signal

import hydra
from omegaconf import DictConfig

import railway_defect  # noqa: F401  (registers the config resolvers)
from railway_defect.errors import UserError

log = logging.getLogger(__name__)
# the disk is full, read-only or not ours: the user must act, a traceback would not help
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from railway_defect.training import run_training  # heavy imports only once the config is valid

    try:
        return run_training(cfg)
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None  # stopped, not finished: never exit 0
    except UserError as e:
        log.error("%s", e)
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        log.error("%s", e)
        raise SystemExit(
            f"error: cannot write {e.filename or 'an output file'}: {e.strerror}; free space or set "
            "hydra.run.dir to another disk (existing checkpoints are intact)."
        ) from None


if __name__ == "__main__":
    main()

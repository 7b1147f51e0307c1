"""Checkpoints written like every other output (railway_defect.utils.outputs.atomic_path).

Lightning's own save goes through fsspec, whose local "transaction" writes the temporary file in
$TMPDIR and moves it into place at the end. With the run directory on another filesystem (a local
temporary folder, shared run storage: the usual cluster case) that move is a copy: kill -9 during it
left a truncated last.ckpt, a full disk a corrupt best.ckpt, and the temporary file stayed in $TMPDIR.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from railway_defect.utils.errors import disk_error
from railway_defect.utils.outputs import atomic_open, remove_stale_temporaries

log = logging.getLogger(__name__)


def is_local(path: str | Path) -> bool:
    return get_filesystem(str(path)).protocol in ("file", ("file", "local"), "local")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints: temporary file in the destination folder, fsync, rename; remote URLs
    (s3://, ...) keep Lightning's own save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        for stale in remove_stale_temporaries(path):
            log.info("Removed %s, left by an interrupted checkpoint write.", stale)
        try:
            with atomic_open(path, "wb") as f:
                torch.save(checkpoint, f)
        except RuntimeError as e:  # torch's writer reports a full disk as a RuntimeError
            disk = disk_error(e)
            if disk is None:
                raise
            raise OSError(disk.errno, disk.strerror, str(path)) from e

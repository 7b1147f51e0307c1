"""Runs started by torchrun with restarts (`--max-restarts=N`): when a process fails, or a node
joins again, torchrun starts every process of the run again with the same command line.

Two things make that restart continue the run rather than fail it or start it over:
- `elastic_restart_checkpoint`: a restarted process continues from the run dir's last.ckpt;
- `join_torchrun_job`: each start of the job gets process-group keys of its own in torchrun's
  store, which outlives the processes. Without that, a restarted process reads the addresses its
  dead predecessors published there and never connects.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from railway_defect.training.checks import is_readable_checkpoint
from railway_defect.utils.outputs import write_text_atomic

log = logging.getLogger(__name__)

TORCHRUN_ID_FILE = ".torchrun_id"
STARTS_KEY = "railway_defect/process_starts"


def elastic_restart_checkpoint(output_dir: Path) -> Path | None:
    """A process of a torchrun job (TORCHELASTIC_RUN_ID) whose run dir that job has used before
    continues from the dir's last.ckpt (the end of the last finished epoch) instead of starting
    over, whichever node failed. `<run>/.torchrun_id` records the job."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    marker = output_dir / TORCHRUN_ID_FILE
    if not (marker.is_file() and marker.read_text(encoding="utf-8") == run_id):
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, run_id)
        return None
    last = output_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and is_readable_checkpoint(last):
        log.warning("torchrun job %s restarted: resuming from %s.", run_id, last)
        return last
    return None


def join_torchrun_job(backend: str, timeout: timedelta) -> None:
    """Under torchrun with more than one process, initialise the process group before Lightning
    does (it then keeps it), on keys of this start of the job: every process counts itself in the
    store, so the n-th start of a job of W processes uses the prefix `attempt_<(n - 1) // W>`
    on every node, however many restarts each node's agent counted."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "TORCHELASTIC_RUN_ID" not in os.environ or world < 2 or dist.is_initialized():
        return
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = (store.add(STARTS_KEY, 1) - 1) // world
    prefixed = dist.PrefixStore(f"railway_defect/attempt_{attempt}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)
    log.info(
        "torchrun job %s: start %d (%d processes).",
        os.environ["TORCHELASTIC_RUN_ID"],
        attempt + 1,
        world,
    )

"""RunRecord: what a training run leaves in `<run>/metrics.json`, written by training and read by
the sweep summary, the review functions, the console and the notebook, so its fields are named
once. Written atomically at the start (status `running`) and at the end of every run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rich
from rich.table import Table

from railway_defect.utils.errors import UserError
from railway_defect.utils.layout import RECORD_FILE
from railway_defect.utils.outputs import write_json_atomic

# status values: a run is `running` until it ends in one of the others
RUNNING, FINISHED, INTERRUPTED, DIVERGED, FAILED = "running", "finished", "interrupted", "diverged", "failed"


@dataclass
class RunRecord:
    """The run record. `val` holds the validation metrics of the epoch best.ckpt comes from (see
    `selection` for what they are worth), `last_val` those of the final epoch, `test` those of
    best.ckpt on a Test split; `history` one row per epoch; `best` the epoch and monitored value."""

    run_dir: str
    status: str = RUNNING
    started_at: str | None = None
    railway_defect_version: str | None = None
    duration_s: float | None = None
    error: str | None = None
    monitor: str | None = None
    optimized_metric_name: str | None = None
    optimized_metric: float | None = None
    best: dict[str, Any] = field(default_factory=dict)
    selection: str | None = None
    val: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: dict[str, str | None] = field(default_factory=dict)
    resumed_from: str | None = None
    pretrained_loaded: bool | None = None
    weights_source: str | None = None
    backbone: str | None = None
    classes: list[str] = field(default_factory=list)
    positive_class: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    epochs_completed: int | None = None
    torch_threads: int | None = None
    precision: str | None = None
    world_size: int | None = None
    tensorboard_dir: str | None = None

    @property
    def best_epoch(self) -> int | None:
        return self.best.get("epoch")

    @property
    def best_checkpoint(self) -> str | None:
        return self.checkpoints.get("best")

    def final_metrics(self) -> dict[str, float]:
        """The numbers a run is compared by: best.ckpt's validation and test metrics, and the
        optimized metric (what a sweeper received)."""
        metrics = {k: float(v) for k, v in {**self.val, **self.test}.items() if isinstance(v, (int, float))}
        if self.optimized_metric_name and isinstance(self.optimized_metric, (int, float)):
            metrics[self.optimized_metric_name] = float(self.optimized_metric)
        return metrics

    def update(self, **values: Any) -> None:
        """Set fields by name; an unknown name is a bug, not a new key in the file."""
        for name, value in values.items():
            if name not in FIELD_NAMES:
                raise TypeError(f"RunRecord has no field {name!r}")
            setattr(self, name, value)

    def write(self) -> Path:
        path = Path(self.run_dir) / RECORD_FILE
        write_json_atomic(path, dataclasses.asdict(self))
        return path

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        """The record of `run_dir`; keys this version does not know (a newer writer) are ignored."""
        path = Path(run_dir) / RECORD_FILE
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is missing or unreadable ({e}).") from e
        if not isinstance(values, dict):
            raise UserError(f"{path} is not the record of a run of this project.")
        return cls(**{"run_dir": str(run_dir), **{k: v for k, v in values.items() if k in FIELD_NAMES}})


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(RunRecord))


def print_run_summary(record: RunRecord) -> None:
    """The end of a run: its metrics, then paths and commands to copy."""
    table = Table(title=f"Run {record.status}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    if record.best_epoch is not None:
        table.add_row("best epoch", str(record.best_epoch))
    for key, value in {**(record.val or record.last_val), **record.test}.items():
        table.add_row(key, f"{value:.4f}")
    rich.print(table)
    console = rich.get_console()
    # paths and commands are printed unwrapped and without markup, so they can be copied
    if record.best_checkpoint:
        console.print(f"best checkpoint: {record.best_checkpoint}", soft_wrap=True, markup=False)
    if record.selection:
        console.print(f"validation metrics: selection {record.selection}", soft_wrap=True, markup=False)
    if not record.pretrained_loaded:
        console.print(
            "note: the backbone started from random weights (no pretrained weights loaded)", style="yellow"
        )
    console.print(f"metrics: {Path(record.run_dir) / RECORD_FILE}", soft_wrap=True, markup=False)
    if record.tensorboard_dir:
        console.print(f"review:  tensorboard --logdir {record.tensorboard_dir}", soft_wrap=True, markup=False)

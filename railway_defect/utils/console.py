"""What the user sees in the terminal: the resolved config as a rich tree at the start, and a
short summary with the best metrics, checkpoint and TensorBoard command at the end."""

from __future__ import annotations

from typing import Any

import rich
from omegaconf import DictConfig, OmegaConf
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

TREE_ORDER = (
    "data",
    "augmentation",
    "model",
    "optimizer",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "paths",
)


def print_config_tree(cfg: DictConfig) -> None:
    tree = Tree("config", style="bold")
    keys = [k for k in TREE_ORDER if k in cfg] + [k for k in cfg if k not in TREE_ORDER]
    for key in keys:
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(f"[bold]{key}").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    rich.print(tree)


def print_run_summary(record: dict[str, Any], monitor: str) -> None:
    table = Table(title=f"Run {record['status']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    best = record.get("best") or {}
    if best.get("epoch") is not None:
        table.add_row("best epoch", str(best["epoch"]))
    val = record.get("val") or record.get("last_val") or {}
    for key, value in {**val, **record.get("test", {})}.items():
        table.add_row(key, f"{value:.4f}")
    rich.print(table)
    console = rich.get_console()
    # paths and commands are printed unwrapped and without markup, so they can be copied
    checkpoints = record.get("checkpoints") or {}
    if checkpoints.get("best"):
        console.print(f"best checkpoint: {checkpoints['best']}", soft_wrap=True, markup=False)
    if record.get("selection"):
        console.print(f"validation metrics: selection {record['selection']}", soft_wrap=True, markup=False)
    if not record.get("pretrained_loaded"):
        console.print(
            "note: the backbone started from random weights (no pretrained weights loaded)", style="yellow"
        )
    console.print(f"metrics: {record['run_dir']}/metrics.json", soft_wrap=True, markup=False)
    if record.get("tensorboard_dir"):
        console.print(
            f"review:  tensorboard --logdir {record['tensorboard_dir']}", soft_wrap=True, markup=False
        )

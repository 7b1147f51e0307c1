"""What the user sees in the terminal when a run starts: the resolved config as a rich tree (the
summary at its end is printed from the run record, railway_defect.training.record)."""

from __future__ import annotations

import rich
from omegaconf import DictConfig, OmegaConf
from rich.syntax import Syntax
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

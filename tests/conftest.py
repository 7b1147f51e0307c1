"""Shared fixtures: the tiny image factory, a tiny data set and the real train config composed
and shrunk to run in seconds on a CPU (the code behind them is in tests/helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from tests.helpers import make_split_dataset, train_config, write_image


@pytest.fixture
def make_image() -> Callable[..., Path]:
    return write_image


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_split_dataset(tmp_path / "data", {"Train": 6, "Validation": 3, "Test": 2})


@pytest.fixture
def compose_train(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """compose_train(*overrides) -> the real train config, output in tmp_path/run."""
    yield lambda *overrides: train_config(tmp_path / "run", *overrides)
    GlobalHydra.instance().clear()

"""Shared fixtures: the tiny image factory, a tiny data set and the real train config composed
and shrunk to run in seconds on a CPU (the code behind them is in tests/helpers.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from tests.helpers import REAL_DATA, make_split_dataset, train_config, write_image


def pytest_sessionstart(session: pytest.Session) -> None:
    """In CI the tests that need the shared data must run: without it the run fails in one line,
    instead of passing with evaluate, predict, export and serve skipped."""
    if os.environ.get("CI", "").lower() == "true" and not REAL_DATA.is_dir():
        pytest.exit(
            f"error: CI=true but the shared sample data {REAL_DATA} is missing; put the shared/ folder "
            "beside the project (or unset CI to skip the tests that need it).",
            returncode=1,
        )


@pytest.fixture(scope="module", autouse=True)
def _module_tmp_removed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """A module's shared folders (its module-scoped fixtures' checkpoints and data) are removed when
    its tests all passed, as pytest removes a passing test's tmp_path (tmp_path_retention_policy):
    the suite's disk use stays near one module's, not the sum of them all."""
    base, failed = tmp_path_factory.getbasetemp(), request.session.testsfailed
    before = set(base.iterdir())
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            if path.name.startswith("test_"):  # a test's own tmp_path: pytest's retention decides
                continue
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)


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

"""Packaging (issue 14): the wheel carries its configs and commands and runs without the checkout;
outputs go under the working directory or $RAILWAY_OUTPUT_DIR; runs and checkpoints record the
package version."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import railway_defect
from railway_defect.training.run import run_training
from railway_defect.utils import paths
from tests.helpers import CONF_DIR, FAST, OFFLINE_ENV, PROJECT_ROOT, REAL_DATA

# what a wheel is built from: the files an sdist holds (MANIFEST.in), nothing else of the checkout
SOURCES = (
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "README.md",
    "conf",
    "railway_defect",
    "hydra_plugins",
)
COMMANDS = ("train", "evaluate", "predict", "export", "serve", "summarize")


def clean_env() -> dict[str, str]:
    """No PYTHONPATH (it would put the checkout first) and none of the project's location variables."""
    drop = {"PYTHONPATH", paths.DATA_DIR_ENV, paths.OUTPUT_DIR_ENV}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **OFFLINE_ENV}


def run(command: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A wheel built from a copy of the sources (the checkout gets no build/ or egg-info), installed
    without dependencies into a fresh virtual env.

    The env sees this interpreter's site-packages (the project's dependencies) through a .pth file.
    Python does not process .pth files inside a directory a .pth file names, so the editable install's
    finder never loads there: `railway_defect` can only come from the wheel."""
    root = tmp_path_factory.mktemp("wheel")
    src, dist, venv = root / "src", root / "dist", root / "venv"
    src.mkdir()
    for name in SOURCES:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    for command in (
        [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist)],
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
    ):
        result = run(command, cwd=root)
        assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = dist.glob("railway_defect-*.whl")
    python = venv / "bin" / "python"
    # installed before the .pth exists, so pip sees an empty env (not the checkout's editable install)
    result = run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root)
    site_packages = Path(purelib.stdout.strip())
    (site_packages / "_project_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = root / "work"
    work.mkdir()
    return {"wheel": wheel, "bin": venv / "bin", "site_packages": site_packages, "work": work}


@pytest.mark.slow
def test_wheel_holds_every_config_and_command(wheel_env: dict[str, Path]) -> None:
    with zipfile.ZipFile(wheel_env["wheel"]) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    packaged = {n.removeprefix("railway_defect/conf/") for n in names if n.startswith("railway_defect/conf/")}
    assert packaged == {p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml")}
    for command in COMMANDS:
        assert f"railway-{command} = railway_defect.{command}:" in entry_points
    assert "License-Expression: MIT" in metadata


@pytest.mark.slow
def test_installed_package_is_the_wheel(wheel_env: dict[str, Path]) -> None:
    """Proves the test below runs the wheel: package, configs and version all come from the venv."""
    probe = (
        "import railway_defect, railway_defect.utils.paths as p; "
        "print(railway_defect.__file__, p.config_dir(), p.is_checkout(), railway_defect.__version__)"
    )
    result = run([str(wheel_env["bin"] / "python"), "-c", probe], cwd=wheel_env["work"])
    assert result.returncode == 0, result.stderr
    module_file, conf, checkout, version = result.stdout.split()
    assert Path(module_file).is_relative_to(wheel_env["site_packages"])
    assert Path(conf) == wheel_env["site_packages"] / "railway_defect" / "conf"
    assert checkout == "False"
    assert version == railway_defect.__version__


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_console_scripts_answer_help(wheel_env: dict[str, Path], command: str) -> None:
    result = run([str(wheel_env["bin"] / f"railway-{command}"), "--help"], cwd=wheel_env["work"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage" in result.stdout.lower() or f"railway_defect.{command}" in result.stdout
    assert not any(wheel_env["work"].iterdir()), "--help must not write anything"


@pytest.mark.slow
def test_wheel_trains_from_an_empty_folder(wheel_env: dict[str, Path]) -> None:
    command = [
        str(wheel_env["bin"] / "railway-train"),
        "debug=fdr",
        "model=resnet18",
        "model.pretrained=false",
        f"data.root={REAL_DATA}",
    ]
    result = run(command, cwd=wheel_env["work"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (wheel_env["work"] / "outputs" / "train" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["railway_defect_version"] == railway_defect.__version__
    hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())
    main_source = next(s for s in hydra_cfg["hydra"]["runtime"]["config_sources"] if s["provider"] == "main")
    assert Path(main_source["path"]) == wheel_env["site_packages"] / "railway_defect" / "conf"


# ---- the checkout: where outputs and data are looked for, and the version each run records ----
def test_config_dir_is_the_checkouts_conf() -> None:
    assert paths.is_checkout()
    assert paths.config_dir() == PROJECT_ROOT / "conf"
    assert Path(paths.CONFIG_DIR).is_absolute()


def test_outputs_go_under_the_working_directory(
    compose_train, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(paths.OUTPUT_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = compose_train()
    assert Path(cfg.paths.output_root) == tmp_path / "outputs"
    assert Path(cfg.paths.cache_dir) == tmp_path / ".cache" / "images"
    monkeypatch.setenv(paths.OUTPUT_DIR_ENV, str(tmp_path / "elsewhere"))
    assert Path(compose_train().paths.output_root) == tmp_path / "elsewhere"


def test_data_is_looked_for_in_the_working_directory_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(paths.DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    candidates = paths.data_root_candidates()
    assert candidates[0] == tmp_path / "data" / "railway-track-fault"
    assert REAL_DATA in candidates  # the sample set beside the checkout stays the last resort
    (tmp_path / "data" / "railway-track-fault").mkdir(parents=True)
    assert paths.default_data_root() == str(tmp_path / "data" / "railway-track-fault")
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path / "mine"))
    assert paths.default_data_root() == str(tmp_path / "mine")


def test_runs_and_checkpoints_record_the_version(compose_train, tiny_dataset: Path) -> None:
    cfg = compose_train(*FAST, f"data.root={tiny_dataset}", "trainer.max_epochs=1", "test=false")
    run_training(cfg)
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["railway_defect_version"] == railway_defect.__version__
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["railway_defect_version"] == railway_defect.__version__


def test_ci_without_the_shared_data_fails_in_one_line(tmp_path: Path) -> None:
    """A checkout without ../shared/datasets: CI=true stops the test run (exit 1) with one line,
    instead of passing with the tests that need the data skipped."""
    checkout = tmp_path / "checkout"
    for name in ("railway_defect", "conf", "tests", "pyproject.toml"):
        copy = shutil.copytree if (PROJECT_ROOT / name).is_dir() else shutil.copy
        copy(PROJECT_ROOT / name, checkout / name)
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(checkout)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layers.py"]
    result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    message = f"error: CI=true but the shared sample data {tmp_path}/shared/datasets"
    assert message in result.stdout + result.stderr
    assert "passed" not in result.stdout

"""Where the configs, the data and the outputs live (OmegaConf resolvers used by conf/paths).

The same code runs from a checkout (`make`, `pip install -e .`) and from an installed wheel, whose
`railway_defect/conf` is the checkout's top-level `conf/` copied in at build time (setup.py). Outputs
never go next to the source: an installed package lives in a read-only site-packages."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # railway_defect/
PROJECT_ROOT = PACKAGE_DIR.parent
DATA_DIR_ENV = "RAILWAY_DATA_DIR"
OUTPUT_DIR_ENV = "RAILWAY_OUTPUT_DIR"
DATA_SUBDIR = Path("data") / "railway-track-fault"


def is_checkout() -> bool:
    """True when running from the source tree (editable install or PYTHONPATH), not a wheel."""
    return (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "conf").is_dir()


def config_dir() -> Path:
    """The configs: the copy inside an installed wheel, else the checkout's top-level conf/.

    The packaged copy wins so that a wheel never picks up an unrelated `conf` folder that happens to
    sit in site-packages; a checkout has no packaged copy (it is only made in the build dir)."""
    packaged = PACKAGE_DIR / "conf"
    return packaged if (packaged / "train.yaml").is_file() else PROJECT_ROOT / "conf"


# @hydra.main needs a string; absolute, so it does not depend on where the entry point lives
CONFIG_DIR = str(config_dir())


def work_dir() -> Path:
    """The folder a command was started in: outputs and caches go below it (Hydra's convention)."""
    return Path.cwd()


def default_output_root(base: str | Path | None = None) -> str:
    """$RAILWAY_OUTPUT_DIR when set, else `<base>/outputs` (base: the working directory)."""
    if os.environ.get(OUTPUT_DIR_ENV):
        return str(Path(os.environ[OUTPUT_DIR_ENV]).expanduser().absolute())
    return str(Path(base or work_dir()).absolute() / "outputs")


def data_root_candidates() -> list[Path]:
    """Places searched for the data, in order: the env variable, ./data/railway-track-fault, then in
    a checkout its own data/ folder and the shared sample set beside it."""
    candidates = []
    if os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
    candidates.append(work_dir() / DATA_SUBDIR)
    if is_checkout():
        candidates.append(PROJECT_ROOT / DATA_SUBDIR)
        candidates.append(PROJECT_ROOT.parent / "shared" / "datasets" / "railway-track-fault")
    return list(dict.fromkeys(candidates))


def default_data_root() -> str:
    """The first candidate that exists (the env variable wins even if missing, so errors name it)."""
    candidates = data_root_candidates()
    if os.environ.get(DATA_DIR_ENV):
        return str(candidates[0])
    return str(next((c for c in candidates if c.is_dir()), candidates[0]))


def register_resolvers() -> None:
    for name, fn in {
        "project_root": lambda: str(PROJECT_ROOT),
        "work_dir": lambda: str(work_dir()),
        "default_output_root": default_output_root,
        "default_data_root": default_data_root,
        # nested CV's inner jobs: the folds 0 .. K-1 and the refit on all of them
        "folds_and_refit": lambda k: ",".join([*map(str, range(int(k))), "refit"]),
        # ... and only the refit scores the outer fold: an inner job's number on it could only mislead
        "is_refit": lambda fold: str(fold) == "refit",
        # optimized_metric's default: the checkpoint monitor's best-so-far value
        "best_of": lambda monitor: f"{monitor}_best" if monitor else None,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)

"""Ships the top-level conf/ inside the wheel as railway_defect/conf.

conf/ stays at the top of the repository, where users look for it and where Hydra's config groups
are edited; an installed package cannot reach it there, so the build copies it into the package.
Everything else about the package is declared in pyproject.toml."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        # an editable install reads the checkout's conf/ directly (railway_defect.utils.paths.config_dir)
        if not getattr(self, "editable_mode", False):
            target = Path(self.build_lib) / "railway_defect" / "conf"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(CONF, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConf})

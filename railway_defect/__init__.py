"""railway_defect: train, review and serve railway track defect classifiers."""

import os

# albumentations asks PyPI for a newer version when first imported (an HTTP request with a 2 s timeout
# and a warning on every offline start); set before any module of this package imports it
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from railway_defect.utils.paths import PROJECT_ROOT, register_resolvers


def _version() -> str:
    """The installed distribution's version; a checkout on PYTHONPATH (not installed) reads its
    pyproject.toml, so metrics.json and checkpoints always say which code produced them."""
    from importlib import metadata

    try:
        return metadata.version("railway-defect")
    except metadata.PackageNotFoundError:
        import re

        pyproject = PROJECT_ROOT / "pyproject.toml"
        text = pyproject.read_text(encoding="utf-8") if pyproject.is_file() else ""
        found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        return found.group(1) if found else "0+unknown"


__version__ = _version()

register_resolvers()

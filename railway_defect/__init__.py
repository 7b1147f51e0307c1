"""railway_defect: train, review and serve railway track defect classifiers."""

import os

# albumentations asks PyPI for a newer version when first imported (an HTTP request with a 2 s timeout
# and a warning on every offline start); set before any module of this package imports it
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from railway_defect.paths import register_resolvers

__version__ = "0.1.0"

register_resolvers()

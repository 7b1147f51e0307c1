"""railway_defect: train, review and serve railway track defect classifiers."""

from railway_defect.paths import register_resolvers

__version__ = "0.1.0"

register_resolvers()

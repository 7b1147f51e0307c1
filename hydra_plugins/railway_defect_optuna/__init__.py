"""Hydra plugin package (Hydra only loads plugins from the `hydra_plugins` namespace)."""

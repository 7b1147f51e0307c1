"""Sweeps: the end-of-sweep summary table and the Hydra callback that writes it."""

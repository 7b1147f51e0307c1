"""Reviewing finished runs: reading runs and sweeps, re-scoring checkpoints, next steps (runs.py),
and the figures (plots.py) shared by the notebook, the training callbacks and evaluate."""

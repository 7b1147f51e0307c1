"""Running a training: the orchestration (run.py), the run record it writes (record.py), checks
before heavy work, Hydra callbacks, and what keeps a run safe (atomic checkpoints, SIGTERM, DDP
launching inside sweeps)."""

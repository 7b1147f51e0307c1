"""One seed per (run seed, epoch), shared by the data side (order, augmentation: the DataModule's
samplers) and the model side (dropout: callbacks.reproducibility.EpochSeed), so a run resumed from
an epoch-end checkpoint continues exactly as the uninterrupted run would have."""

from __future__ import annotations


def epoch_seed(seed: int, epoch: int) -> int:
    """Distinct per (seed, epoch); seeds 1 and 2 never share an epoch's stream."""
    return (seed * 100_003 + epoch) % 2**32

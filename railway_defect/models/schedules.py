"""Learning-rate schedules that torch does not ship as one class: linear warmup, then cosine."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_epochs: int, max_epochs: int, min_factor: float = 0.0
) -> LambdaLR:
    """Stepped once per epoch: the lr rises linearly over `warmup_epochs` (from 1/(warmup+1) of it),
    then follows a cosine to `min_factor` times it at `max_epochs`. Warmup keeps the first large
    gradients of a new head from wrecking pretrained features."""

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        progress = (epoch - warmup_epochs) / max(1, max_epochs - warmup_epochs)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)

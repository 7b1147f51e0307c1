"""Albumentations pipelines: the configured augmentations for training, then one shared resize
and normalisation (mean/std from the backbone) so train and eval images match."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
from albumentations.pytorch import ToTensorV2


def build_transform(
    augmentations: Sequence[A.BasicTransform],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int | None = None,
) -> A.Compose:
    """`augmentations` (may be empty for evaluation) + resize to a square + normalise + to tensor.

    albumentations ignores global seeds; `seed` makes the augmentation sequence reproducible.
    """
    return A.Compose(
        [
            *augmentations,
            A.Resize(image_size, image_size),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ],
        seed=seed,
    )

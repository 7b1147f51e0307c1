"""Frozen-feature study: the pooled, flip-averaged features of a frozen ImageNet backbone for every
photo of a data root, computed once with the framework's own decoding, storage form (harmonize),
resize and normalisation, so that heads, groupings and threshold rules can be compared by nested,
group-aware cross-validation in seconds instead of one training run per fold (STUDY.md).

    python benchmarks/study_features.py --root ../shared/datasets/railway-track-fault-full \
        --out outputs/study_features [--variants lite2_thumb260,lite2_none260]

Each variant writes <out>/<variant>.npz: paths, labels, declared groups, sources and features.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine_info, parser

from railway_defect.data.discovery import discover
from railway_defect.data.images import decode_files
from railway_defect.data.transforms import build_transform
from railway_defect.models.backbones import create_backbone
from railway_defect.models.network import FLIP_AXES, pooled_features

# name -> (backbone, storage form, decode size, input size[, flip-invariant: default true])
VARIANTS = {
    # the backbone of model=efficientnet_lite2_stages: blocks 2, 4, 6 pooled beside the final features
    "lite2_stages448": ("efficientnet_lite2_stages", "none", 448, 448),
    "lite2_stages384": ("efficientnet_lite2_stages", "none", 384, 384),
    # ... at 512 px: the sleepers' Fair frames differ from Good by hairline cracks (issue 29)
    "lite2_stages512": ("efficientnet_lite2_stages", "none", 512, 512),
    "lite2_thumb448": ("efficientnet_lite2", "thumbnail", 448, 448),
    "lite2_none448_noflip": ("efficientnet_lite2", "none", 448, 448, False),
    "lite2_none640_noflip": ("efficientnet_lite2", "none", 640, 640, False),
    "lite2_thumb260": ("efficientnet_lite2", "thumbnail", 260, 260),
    "lite2_none260": ("efficientnet_lite2", "none", 260, 260),
    "lite2_none320": ("efficientnet_lite2", "none", 320, 320),
    "lite2_none384": ("efficientnet_lite2", "none", 384, 384),
    "lite2_none448": ("efficientnet_lite2", "none", 448, 448),
    "lite0_none448": ("efficientnet_lite0", "none", 448, 448),
    "lite1_none260": ("efficientnet_lite1", "none", 260, 260),
    "lite1_thumb240": ("efficientnet_lite1", "thumbnail", 240, 240),
    "lite0_thumb224": ("efficientnet_lite0", "thumbnail", 224, 224),
}
# name -> (storage form, size): the maps of model=efficientnet_lite2_stages (blocks 2, 4, 6 and the
# head) pooled several ways in one pass; each pooling writes <variant>_<pool>.npz (`_mean` is
# lite2_stages at that size: the framework's features)
POOLED_VARIANTS = {
    "lite2_pools384": ("none", 384),
    "lite2_pools448": ("none", 448),
    "lite2_pools640": ("none", 640),
}
POOLS = {"mean": lambda x: x.mean(dim=(2, 3)), "max": lambda x: x.amax(dim=(2, 3))}


def flip_pooled(stages: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every pooling of the stage maps, averaged over the photo and its three flips."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in POOLS}
    for axes in FLIP_AXES:
        maps = stages.maps(images.flip(axes) if axes else images)
        for name, pool in POOLS.items():
            out[name].append(torch.cat([pool(x) for x in maps], dim=1))
    return {name: torch.stack(views).mean(0) for name, views in out.items()}


def sources(root: Path) -> dict[str, str]:
    """The manifest's `source` column (storage form of the public export), when it has one."""
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return {}
    with manifest.open(newline="", encoding="utf-8") as f:
        return {str(root / r["path"]): r.get("source", "") for r in csv.DictReader(f)}


@torch.inference_mode()
def extract(root: Path, variant: str, batch: int = 16) -> dict[str, dict[str, np.ndarray]]:
    """{npz name: arrays} for `variant` (one file, or one per pooling of a POOLED_VARIANTS one)."""
    if variant in POOLED_VARIANTS:
        name, (mode, decode_size) = "efficientnet_lite2_stages", POOLED_VARIANTS[variant]
        input_size = decode_size
    else:
        name, mode, decode_size, input_size, *flips = VARIANTS[variant]
    index = discover(root, train_on="train_and_val")
    samples = [s for split in index.splits.values() for s in split]
    decoded = decode_files([s.path for s in samples], decode_size, mode=mode)
    backbone = create_backbone(name, pretrained=True, require_pretrained=True)
    model = backbone.model.eval()
    transform = build_transform([], input_size, backbone.spec.mean, backbone.spec.std)
    kept = [s for s in samples if s.path in decoded.images]
    features: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(kept), batch):
        images = torch.stack(
            [transform(image=decoded.images[s.path])["image"] for s in kept[start : start + batch]]
        )
        if variant in POOLED_VARIANTS:
            pooled = {f"{variant}_{k}": v for k, v in flip_pooled(model, images).items()}
        else:
            pooled = {variant: pooled_features(model, images, flip_invariant=flips[0] if flips else True)}
        for key, value in pooled.items():
            features.setdefault(key, []).append(value.numpy())
    source = sources(root)
    columns = {
        "paths": np.array([str(s.path) for s in kept]),
        "labels": np.array([s.label for s in kept]),
        "groups": np.array([s.group for s in kept]),
        "sources": np.array([source.get(str(s.path), "") for s in kept]),
    }
    return {key: {**columns, "features": np.concatenate(v).astype(np.float32)} for key, v in features.items()}


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("outputs/study_features"))
    p.add_argument("--variants", default="lite2_thumb260,lite2_none260")
    args = p.parse_args()
    print(machine_info())
    args.out.mkdir(parents=True, exist_ok=True)
    for variant in args.variants.split(","):
        start = time.perf_counter()
        for key, arrays in extract(args.root, variant).items():
            np.savez(args.out / f"{key}.npz", **arrays)
            print(f"{key}: {arrays['features'].shape} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

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
from railway_defect.models.network import pooled_features

# name -> (backbone, storage form, decode size, input size[, flip-invariant: default true])
VARIANTS = {
    # the backbone of model=efficientnet_lite2_stages: blocks 2, 4, 6 pooled beside the final features
    "lite2_stages448": ("efficientnet_lite2_stages", "none", 448, 448),
    "lite2_stages384": ("efficientnet_lite2_stages", "none", 384, 384),
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


def sources(root: Path) -> dict[str, str]:
    """The manifest's `source` column (storage form of the public export), when it has one."""
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return {}
    with manifest.open(newline="", encoding="utf-8") as f:
        return {str(root / r["path"]): r.get("source", "") for r in csv.DictReader(f)}


@torch.inference_mode()
def extract(root: Path, variant: str, batch: int = 16) -> dict[str, np.ndarray]:
    name, mode, decode_size, input_size, *flips = VARIANTS[variant]
    index = discover(root, train_on="train_and_val")
    samples = [s for split in index.splits.values() for s in split]
    decoded = decode_files([s.path for s in samples], decode_size, mode=mode)
    backbone = create_backbone(name, pretrained=True, require_pretrained=True)
    model = backbone.model.eval()
    transform = build_transform([], input_size, backbone.spec.mean, backbone.spec.std)
    kept = [s for s in samples if s.path in decoded.images]
    features = []
    for start in range(0, len(kept), batch):
        images = torch.stack(
            [transform(image=decoded.images[s.path])["image"] for s in kept[start : start + batch]]
        )
        features.append(pooled_features(model, images, flip_invariant=flips[0] if flips else True).numpy())
    source = sources(root)
    return {
        "paths": np.array([str(s.path) for s in kept]),
        "labels": np.array([s.label for s in kept]),
        "groups": np.array([s.group for s in kept]),
        "sources": np.array([source.get(str(s.path), "") for s in kept]),
        "features": np.concatenate(features).astype(np.float32),
    }


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
        arrays = extract(args.root, variant)
        np.savez(args.out / f"{variant}.npz", **arrays)
        print(f"{variant}: {arrays['features'].shape} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

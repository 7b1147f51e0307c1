"""Images/s of the training DataLoader alone on the sample data (full-resolution photos): the first
epoch (decoding every file once, into memory) vs later epochs (cache + augmentation only) vs a naive
loader that fully decodes each file with PIL on every access (the same augmentation on both).
Goals: later epochs >= 20x the naive decode, and the loader is never the bottleneck of a ResNet-50
training step on this CPU.

    python benchmarks/bench_data.py [--quick] [--repeats 3] [--data PATH]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import (
    SAMPLE_DATA,
    alternate,
    machine_info,
    make_synthetic_dataset,
    offline,
    parser,
    report,
    stats,
)
from bench_overhead import compose


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", type=Path, default=SAMPLE_DATA)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--naive-images", type=int, default=None, help="files the naive loader decodes (all)")
    p.add_argument(
        "--epochs",
        type=int,
        default=10,
        help="cached epochs timed per repeat (one is ~50 ms: too short alone)",
    )
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    epochs = 1 if args.quick else args.epochs
    offline()

    import numpy as np
    import torch
    from hydra.utils import instantiate
    from PIL import Image

    from railway_defect.data.datamodule import RailwayDataModule
    from railway_defect.models.contract import ModelContract
    from railway_defect.models.module import DefectClassifier

    print(machine_info())
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_dataset(Path(tmp) / "data", 4, (800, 600)) if args.quick else args.data
        cfg = compose(root, Path(tmp) / "run", "resnet50", 224, args.batch_size, 1)
        dm = RailwayDataModule.from_settings(
            root=root, batch_size=args.batch_size, train_transforms=instantiate(cfg.augmentation.transforms)
        )
        start = time.perf_counter()
        dm.setup("fit")
        count = sum(len(y) for _, y in dm.train_dataloader())
        first = count / (time.perf_counter() - start)
        print(
            f"config: data={'synthetic 800x600' if args.quick else root.name} train_images={count} "
            f"batch={args.batch_size} cached_epochs_per_repeat={epochs}"
        )
        print(f"first epoch (decode all + iterate): {first:.2f} img/s")
        files = [s.path for s in dm.splits["train"]][: args.naive_images or None]
        transform = dm.train_transform

        def cached() -> float:
            start = time.perf_counter()
            n = sum(len(y) for _ in range(epochs) for _, y in dm.train_dataloader())
            return n / (time.perf_counter() - start)

        def naive() -> float:
            start = time.perf_counter()
            for path in files:
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                transform(image=pixels)
            return len(files) / (time.perf_counter() - start)

        later, naive_rates = alternate(cached, naive, repeats)
        report("cache", "later epochs", later, "naive PIL decode", naive_rates, "img/s")
        print("goal: ratio >= 20")

        backbone = "resnet18" if args.quick else "resnet50"
        contract = ModelContract.for_backbone(backbone, dm.classes, dm.positive_class)
        model = DefectClassifier(backbone, contract, pretrained=False)
        size = 32 if args.quick else dm.image_size
        x = torch.randn(min(args.batch_size, 8), 3, size, size)
        y = torch.zeros(len(x), dtype=torch.long)
        optimizer = torch.optim.AdamW(model.parameters())
        steps = []
        for _ in range(1 + repeats):
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps.append(len(x) / (time.perf_counter() - start))
        steps = steps[1:]
        print(f"{'resnet18 32 px' if args.quick else 'resnet50'} training step: {stats(steps)} img/s")
        print(
            f"loader / model step: {min(later) / max(steps):.1f}x at worst (goal: > 1, never the bottleneck)"
        )


if __name__ == "__main__":
    main()

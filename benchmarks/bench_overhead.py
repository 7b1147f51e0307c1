"""Training images/s of the framework's loop (the real train config through Lightning: callbacks,
logger, metrics, EpochSampler and augmentation) vs a minimal hand-written PyTorch loop doing the same
work on the same DataLoader. Goal: ratio >= 0.95.

Each repeat trains a fresh model for `--epochs` epochs on both sides; the first epoch of each is a
warm-up and only the later ones are timed (epoch start to epoch end, so the per-epoch checkpoint
write, which Lightning runs after the epoch, is excluded; validation is switched off on both sides).

    python benchmarks/bench_overhead.py [--quick] [--backbone resnet50] [--repeats 3]
    python benchmarks/bench_overhead.py --accelerator gpu --batch-size 128 --synthetic 2048 --num-workers 8

On a GPU both sides train in 16-mixed precision (the trainer's `precision: auto`), channels_last.
`--synthetic N` trains on N generated photos per class instead of the 79 sample photos, enough
batches for a throughput at batch 128. `--decode gpu` makes each batch on the device (data.decode:
JPEG bytes decoded and augmented there); both sides then read batches that way.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import SAMPLE_DATA, alternate, machine_info, make_synthetic_dataset, offline, parser, report


def compose(
    data_root: Path,
    output_dir: Path,
    backbone: str,
    image_size: int,
    batch_size: int,
    epochs: int,
    accelerator: str = "cpu",
    num_workers: int | None = None,
    decode: str = "auto",
):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    import railway_defect  # noqa: F401  (registers resolvers)
    from railway_defect.training.run import resolve_hardware_defaults
    from railway_defect.utils.paths import PROJECT_ROOT

    overrides = [
        f"model={backbone}",
        "model.pretrained=false",
        f"data.root={data_root}",
        f"data.image_size={image_size}",
        f"data.cache_size={max(image_size, int(image_size * 8 / 7))}",
        f"data.batch_size={batch_size}",
        f"trainer.max_epochs={epochs}",
        f"trainer.accelerator={accelerator}",
        f"data.num_workers={'null' if num_workers is None else num_workers}",
        f"data.decode={decode}",
        "++trainer.limit_val_batches=0",
        "++trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
        "callbacks.review=null",
    ]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    resolve_hardware_defaults(cfg)
    return cfg


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="per repeat and side; the first is a warm-up")
    p.add_argument("--data", type=Path, default=SAMPLE_DATA)
    p.add_argument("--accelerator", default="cpu", help="cpu | gpu (both sides on that device)")
    p.add_argument("--synthetic", type=int, default=0, help="generated training photos per class")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers (default: the data default)")
    p.add_argument(
        "--decode", default="auto", help="data.decode: auto | cpu | gpu (batches made on the device)"
    )
    args = p.parse_args()
    if args.quick:
        args.backbone, args.image_size, args.batch_size, args.epochs = "resnet18", 32, 4, 2
    repeats = args.repeats or (1 if args.quick else 3)
    offline()

    import lightning as L
    import torch
    from torch.nn import functional as F

    from railway_defect.data.device import accelerator_device_type
    from railway_defect.training.run import _instantiate, _instantiate_all, build_datamodule, build_model

    print(machine_info())
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = 4 if args.quick and not args.synthetic else args.synthetic
        data_root = (
            make_synthetic_dataset(Path(tmp) / "data", synthetic, (320, 240)) if synthetic else args.data
        )
        cfg = compose(
            data_root,
            Path(tmp) / "run",
            args.backbone,
            args.image_size,
            args.batch_size,
            args.epochs,
            args.accelerator,
            args.num_workers,
            args.decode,
        )
        datamodule = build_datamodule(cfg)
        datamodule.device_type = accelerator_device_type(args.accelerator)
        datamodule.setup("fit")  # decodes once: both sides then read the same in-memory images

        def new_model():
            L.seed_everything(cfg.seed, verbose=False)
            return build_model(cfg, datamodule)

        class EpochTimer(L.Callback):
            def __init__(self):
                self.seconds, self.images, self.start, self.count = 0.0, 0, 0.0, 0

            def on_train_epoch_start(self, trainer, module):
                self.start, self.count = time.perf_counter(), 0

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                self.count += len(batch[1])

            def on_train_epoch_end(self, trainer, module):
                if trainer.current_epoch > 0:  # epoch 0 is the warm-up
                    self.seconds += time.perf_counter() - self.start
                    self.images += self.count

        def framework() -> float:
            timer = EpochTimer()
            callbacks = [*_instantiate_all(cfg.callbacks), timer]
            trainer = _instantiate(
                cfg.trainer, callbacks=callbacks, logger=_instantiate_all(cfg.logger) or False
            )
            trainer.fit(new_model(), datamodule=datamodule)
            return timer.images / timer.seconds

        cuda = args.accelerator in ("gpu", "cuda")
        device = torch.device("cuda" if cuda else "cpu")

        def hand_written() -> float:
            model = new_model().to(device)
            model.train()
            optimizer = model.configure_optimizers()
            optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
            scaler = torch.amp.GradScaler("cuda", enabled=cuda)  # what 16-mixed does
            seconds, images = 0.0, 0
            for epoch in range(args.epochs):
                start, count = time.perf_counter(), 0
                for batch in datamodule.train_dataloader():
                    # as Lightning moves a batch: made on the device with data.decode=gpu
                    x, y = datamodule.transfer_batch_to_device(batch, device, 0)
                    x = x.contiguous(memory_format=torch.channels_last)
                    with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                        loss = F.cross_entropy(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    count += len(y)
                if cuda:
                    torch.cuda.synchronize()
                if epoch > 0:
                    seconds += time.perf_counter() - start
                    images += count
            return images / seconds

        print(
            f"config: backbone={args.backbone} image_size={args.image_size} batch={args.batch_size} "
            f"train_images={len(datamodule.splits['train'])} epochs={args.epochs} (1 warm-up) "
            f"repeats={repeats} accelerator={args.accelerator} precision={cfg.trainer.precision} "
            f"decode={datamodule.decode_used}"
        )
        fw, hand = alternate(framework, hand_written, repeats)
        report("overhead", "framework", fw, "hand-written", hand, "img/s")
        print("goal: ratio >= 0.95")


if __name__ == "__main__":
    main()

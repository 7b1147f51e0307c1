"""Train and inference images/s at 224 px for each backbone of the factory, fp32 (contiguous) vs
channels_last, alternating in one process; on a GPU also 16-mixed with channels_last. With
`--compile`, also torch.compile (model.compile=true) vs eager, both channels_last, after printing
how long the compilation took.

    python benchmarks/bench_backbones.py [--quick] [--repeats 3] [--backbones resnet18,resnet50] [--compile]
"""

from __future__ import annotations

import time

from _common import alternate, machine_info, offline, parser, report


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--backbones", default="resnet18,resnet34,resnet50,resnet101,efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    p.add_argument("--compile", action="store_true", help="also measure model.compile=true")
    args = p.parse_args()
    if args.quick:
        args.backbones, args.image_size, args.batch_size, args.steps = "resnet18", 32, 2, 1
    repeats = args.repeats or (1 if args.quick else 3)
    offline()

    import torch

    from railway_defect.models.contract import ModelContract
    from railway_defect.models.module import DefectClassifier

    print(machine_info())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True  # trainer.benchmark=auto
    print(f"config: size={args.image_size} batch={args.batch_size} steps={args.steps} repeats={repeats}")
    for name in args.backbones.split(","):
        models = {}
        for key, channels_last, compile in (
            (False, False, False),
            (True, True, False),
            ("compiled", True, True),
        ):
            if compile and not args.compile:
                continue
            torch.manual_seed(0)
            models[key] = DefectClassifier(
                name,
                ModelContract.for_backbone(name, ["Defective", "Non defective"], "Defective"),
                pretrained=False,
                channels_last=channels_last,
                compile=compile,
            ).to(device)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        y = torch.zeros(args.batch_size, dtype=torch.long, device=device)

        def train(channels_last: bool | str, autocast: bool = False, models=models, x=x, y=y) -> float:
            model = models[channels_last].train()
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
            with torch.autocast(device, dtype=torch.float16, enabled=autocast):
                loss = torch.nn.functional.cross_entropy(model(x), y)  # warm-up step
            loss.backward()
            start = time.perf_counter()
            for _ in range(args.steps):
                with torch.autocast(device, dtype=torch.float16, enabled=autocast):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            return args.steps * args.batch_size / (time.perf_counter() - start)

        @torch.inference_mode()
        def infer(channels_last: bool | str, autocast: bool = False, models=models, x=x) -> float:
            model = models[channels_last].eval()
            with torch.autocast(device, dtype=torch.float16, enabled=autocast):
                model(x)
                start = time.perf_counter()
                for _ in range(args.steps):
                    model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            return args.steps * args.batch_size / (time.perf_counter() - start)

        for stage, fn in (("train", train), ("inference", infer)):
            print(f"-- {name} {stage}")
            cl, fp = alternate(lambda fn=fn: fn(True), lambda fn=fn: fn(False), repeats)
            report(f"{name} {stage}", "channels_last", cl, "fp32 contiguous", fp, "img/s")
            if device == "cuda":
                mixed, _ = alternate(lambda fn=fn: fn(True, True), lambda: 1.0, repeats)
                report(
                    f"{name} {stage} 16-mixed",
                    "16-mixed channels_last",
                    mixed,
                    "fp32 contiguous",
                    fp,
                    "img/s",
                )
            if args.compile:
                start = time.perf_counter()
                fn("compiled")  # compiles (its warm-up step) and measures once
                print(f"{name} {stage} compile + first measurement: {time.perf_counter() - start:.1f} s")
                compiled, eager = alternate(lambda fn=fn: fn("compiled"), lambda fn=fn: fn(True), repeats)
                report(
                    f"{name} {stage} compiled", "compiled", compiled, "eager channels_last", eager, "img/s"
                )


if __name__ == "__main__":
    main()

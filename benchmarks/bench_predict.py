"""Predict throughput (image files on disk -> decode -> model -> CSV, `run_prediction` as
`python -m railway_defect.predict` runs it) vs the raw model forward on in-memory tensors, same
batch size and model. Goal: ratio >= 0.85.

    python benchmarks/bench_predict.py [--quick] [--repeats 3] [--data PATH] [--backbone resnet50]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import SAMPLE_DATA, alternate, machine_info, make_synthetic_dataset, offline, parser, report


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", type=Path, default=SAMPLE_DATA, help="a folder of images (searched recursively)")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    if args.quick:
        args.backbone, args.batch_size = "resnet18", 4
    repeats = args.repeats or (1 if args.quick else 3)
    offline()

    import torch

    from railway_defect.inference.predicting import run_prediction
    from railway_defect.models.module import DefectClassifier

    print(machine_info())
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(Path(tmp) / "data", 4, (800, 600)) if args.quick else args.data
        size = 64 if args.quick else 224
        torch.manual_seed(0)
        model = DefectClassifier(args.backbone, ["Defective", "Non defective"], "Defective", pretrained=False)
        model.hparams.update(input_size=size, cache_size=size * 8 // 7)
        checkpoint = Path(tmp) / "model.ckpt"
        torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, checkpoint)
        model.eval()

        def predict() -> float:
            start = time.perf_counter()
            summary = run_prediction(
                str(checkpoint),
                str(data),
                Path(tmp) / "out.csv",
                batch_size=args.batch_size,
                device="cpu",
                progress=False,
            )
            if summary.failed:
                raise SystemExit(f"{summary.failed} files could not be scored")
            predict.rows = summary.rows
            return summary.rows / (time.perf_counter() - start)

        predict()  # warm-up, and counts the files
        batches = [
            torch.randn(min(args.batch_size, predict.rows - i), 3, size, size)
            for i in range(0, predict.rows, args.batch_size)
        ]

        @torch.inference_mode()
        def forward() -> float:
            start = time.perf_counter()
            for x in batches:
                model(x).softmax(dim=1)
            return predict.rows / (time.perf_counter() - start)

        print(f"config: backbone={args.backbone} size={size} batch={args.batch_size} files={predict.rows}")
        files, raw = alternate(predict, forward, repeats)
        report("predict", "files -> CSV", files, "raw forward", raw, "img/s")
        print("goal: ratio >= 0.85")


if __name__ == "__main__":
    main()

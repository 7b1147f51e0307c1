"""Predict throughput (image files on disk -> decode -> model -> CSV, `run_prediction` as
`python -m railway_defect.predict` runs it) vs the raw model forward on in-memory tensors, same
batch size and model, on `--device` (cpu by default; gpu_check.sh passes cuda). Goal: ratio >= 0.85.

Then fp32 PyTorch vs fp32 ONNX Runtime vs int8 ONNX Runtime (`export quantize=int8`): images/s on
preprocessed batches on the CPU, and AUROC / balanced accuracy on the validation images. Goal: int8 >= 2x the
fp32 PyTorch images/s with AUROC within 0.01. Give `--ckpt` a trained checkpoint for meaningful
accuracy (int8 calibrates on its run's training images and is scored on its validation images);
without it the model has random weights.

    python benchmarks/bench_predict.py [--quick] [--repeats 3] [--data PATH] [--backbone resnet50]
        [--ckpt PATH/checkpoints/best.ckpt] [--device cuda]
    python benchmarks/bench_predict.py --generate 20000 --device cuda --decode gpu,cpu --batch-size 256 \
        --no-formats       # issue 32's goal: >= 2,000 img/s end to end on 640x480 JPEGs

`--decode` (predict's decode: auto | cpu | gpu, comma-separated to compare) says where JPEGs are
decoded; each mode gets its own `files -> CSV decode=<mode>` line and ratio.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import (
    SAMPLE_DATA,
    alternate,
    machine_info,
    make_photos,
    make_synthetic_dataset,
    offline,
    parser,
    report,
)

from railway_defect.utils.layout import run_dir_of


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", type=Path, default=SAMPLE_DATA, help="a folder of images (searched recursively)")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ckpt", type=Path, default=None, help="a trained checkpoint (default: random weights)")
    p.add_argument("--device", default="cpu", help="where predict and the raw forward run (cpu, cuda)")
    p.add_argument("--decode", default="auto", help="predict's decode modes, comma-separated (auto,cpu,gpu)")
    p.add_argument(
        "--generate", type=int, default=0, help="score N generated photo-like JPEGs instead of --data"
    )
    p.add_argument("--photo-size", default="640x480", help="WxH of the generated JPEGs")
    p.add_argument("--no-formats", action="store_true", help="leave out the ONNX / int8 comparison")
    args = p.parse_args()
    if args.quick:
        args.backbone, args.batch_size = "resnet18", 4
    repeats = args.repeats or (1 if args.quick else 3)
    offline()

    import torch

    from railway_defect.inference.model import load_predictor
    from railway_defect.inference.predicting import run_prediction
    from railway_defect.models.contract import ModelContract
    from railway_defect.models.module import DefectClassifier

    print(machine_info())
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(Path(tmp) / "data", 4, (800, 600)) if args.quick else args.data
        if args.generate:
            width, height = (int(v) for v in args.photo_size.split("x"))
            start = time.perf_counter()
            data = make_photos(Path(tmp) / "photos", args.generate, (width, height))
            print(f"generated {args.generate} {width}x{height} JPEGs in {time.perf_counter() - start:.1f} s")
        size = 64 if args.quick else 224
        torch.manual_seed(0)
        if args.ckpt:
            checkpoint = args.ckpt
            model = load_predictor(checkpoint, device=args.device).model
            size = model.contract.input_size
        else:
            model = DefectClassifier(
                args.backbone,
                ModelContract.for_backbone(
                    args.backbone, ["Defective", "Non defective"], "Defective", size, size * 8 // 7
                ),
                pretrained=False,
            )
            checkpoint = Path(tmp) / "model.ckpt"
            torch.save(
                {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, checkpoint
            )
        model.eval().to(args.device)

        def predict_with(decode: str) -> Callable[[], float]:
            def predict() -> float:
                start = time.perf_counter()
                summary = run_prediction(
                    str(checkpoint),
                    str(data),
                    Path(tmp) / "out.csv",
                    batch_size=args.batch_size,
                    device=args.device,
                    progress=False,
                    decode=decode,
                )
                if summary.failed:
                    raise SystemExit(f"{summary.failed} files could not be scored")
                rows[0] = summary.rows
                return summary.rows / (time.perf_counter() - start)

            return predict

        rows = [0]
        modes = args.decode.split(",")
        predict_with(modes[0])()  # warm-up, and counts the files
        batches = [
            torch.randn(min(args.batch_size, rows[0] - i), 3, size, size, device=args.device)
            for i in range(0, rows[0], args.batch_size)
        ]

        @torch.inference_mode()
        def forward() -> float:
            start = time.perf_counter()
            for x in batches:
                model(x).softmax(dim=1).cpu()  # as the predictor returns them (and waits for a GPU)
            return rows[0] / (time.perf_counter() - start)

        backbone = model.hparams["backbone"]
        print(
            f"config: backbone={backbone} size={size} batch={args.batch_size} files={rows[0]} "
            f"device={args.device}"
        )
        for i, decode in enumerate(modes):
            files, raw = alternate(predict_with(decode), forward, repeats)
            label = "files -> CSV" if i == 0 and len(modes) == 1 else f"files -> CSV decode={decode}"
            report(
                "predict" if i == 0 else f"predict decode={decode}", label, files, "raw forward", raw, "img/s"
            )
        print("goal: ratio >= 0.85")
        if not args.no_formats:
            compare_formats(checkpoint, data, Path(tmp), args.batch_size, repeats, args.quick)


def round_robin(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each repeat runs every side once, the order rotating, so drifting load hits all sides alike."""
    names = list(fns)
    results: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            results[name].append(fns[name]())
    return results


def compare_formats(
    checkpoint: Path, data: Path, tmp: Path, batch_size: int, repeats: int, quick: bool
) -> None:
    """fp32 PyTorch, fp32 ONNX Runtime and int8 ONNX Runtime on the same preprocessed images."""
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from railway_defect.data.discovery import discover
    from railway_defect.data.images import decode_files
    from railway_defect.data.splits import SPLITS_FILE, read_split_record
    from railway_defect.inference.exporting import export_model
    from railway_defect.inference.model import load_predictor

    run = run_dir_of(checkpoint)
    recorded = (run / SPLITS_FILE).is_file() and (run / "data_report.json").is_file()
    if recorded:  # the run's own validation images, and int8 calibrated on its training images
        root = Path(json.loads((run / "data_report.json").read_text())["root"])
        splits = read_split_record(run / SPLITS_FILE, root)[0]
        calibration = None
    else:
        splits = discover(data).splits
        calibration = str(data / "Train")
    scored = splits.get("val", []) + splits.get("test", [])
    fp32_path, int8_path = tmp / "fp32.onnx", tmp / "int8.onnx"
    export_model(str(checkpoint), "onnx", fp32_path)
    start = time.perf_counter()
    result = export_model(str(checkpoint), "onnx", int8_path, quantize="int8", calibration_data=calibration)
    source = "the run's training images" if recorded else calibration
    print(
        f"int8 export: {time.perf_counter() - start:.1f} s, calibrated on "
        f"{result['quantization']['calibration_images']} images from {source}; sizes: "
        f"fp32 {fp32_path.stat().st_size / 1e6:.1f} MB, int8 {int8_path.stat().st_size / 1e6:.1f} MB"
    )
    predictors = {
        "fp32 pytorch": load_predictor(checkpoint, device="cpu"),
        "fp32 onnxruntime": load_predictor(fp32_path, device="cpu"),
        "int8 onnxruntime": load_predictor(int8_path, device="cpu"),
    }
    reference = predictors["fp32 pytorch"]
    info = reference.contract
    decoded = decode_files([s.path for s in scored], info.decode_size, mode=info.harmonize)
    kept = [s for s in scored if s.path in decoded.images]
    images = reference.preprocess([decoded.images[s.path] for s in kept])
    is_positive = np.array([s.label == info.positive_class for s in kept])
    # throughput on every decoded image of the data (scored or not), preprocessed once
    every = discover(data).splits
    all_files = [s.path for samples in every.values() for s in samples]
    pool = decode_files(all_files, info.decode_size, mode=info.harmonize).images
    timing = reference.preprocess(list(pool.values()))
    batches = [timing[i : i + batch_size] for i in range(0, len(timing), batch_size)]

    def throughput(predictor) -> Callable[[], float]:
        def run_all() -> float:
            begin = time.perf_counter()
            for batch in batches:
                predictor.logits(batch)
            return len(timing) / (time.perf_counter() - begin)

        return run_all

    for predictor in predictors.values():
        throughput(predictor)()  # warm-up: first-call allocations and kernel selection
    speeds = round_robin({name: throughput(p) for name, p in predictors.items()}, repeats)
    print(f"formats: {len(timing)} images, batch {batch_size}, {repeats} repeats (images/s, model only)")
    report(
        "onnx fp32",
        "fp32 onnxruntime",
        speeds["fp32 onnxruntime"],
        "fp32 pytorch",
        speeds["fp32 pytorch"],
        "img/s",
    )
    report(
        "int8",
        "int8 onnxruntime",
        speeds["int8 onnxruntime"],
        "fp32 pytorch",
        speeds["fp32 pytorch"],
        "img/s",
    )

    probs = {
        name: p.probabilities(images, temperature=1.0)[:, info.positive_index]
        for name, p in predictors.items()
    }
    threshold = reference.calibration.threshold
    base_auroc = base_bacc = None
    print(
        f"accuracy on {len(kept)} images ({int(is_positive.sum())} {info.positive_class}), "
        f"threshold {threshold:.3g}:"
    )
    for name, p in probs.items():
        both = 0 < is_positive.sum() < len(is_positive)
        auroc = roc_auc_score(is_positive, p) if both else float("nan")
        bacc = balanced_accuracy_score(is_positive, p >= threshold) if both else float("nan")
        if base_auroc is None:
            base_auroc, base_bacc = auroc, bacc
        diff = float(np.abs(p - probs["fp32 pytorch"]).max())
        print(
            f"accuracy {name}: auroc={auroc:.4f} (Δ {auroc - base_auroc:+.4f}) "
            f"balanced_acc={bacc:.4f} (Δ {bacc - base_bacc:+.4f}) max|Δp|={diff:.4f}"
        )
    print(
        "goal: int8 ratio >= 2 with |Δ auroc| <= 0.01" + (" (--quick: numbers mean nothing)" if quick else "")
    )


if __name__ == "__main__":
    main()

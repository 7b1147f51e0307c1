"""Data that outgrow memory: peak memory (RSS high-water mark of the child process, and its peak
anonymous memory: RSS less the chunk-file pages LitData maps, sampled) of a training
run (`train debug=fdr`, resnet18) on generated folders of growing size, with the decoded images in
memory (data.storage=memory) or streamed from LitData chunks (data.storage=stream); the time to
build the optimized form; and the training loader's images/s in a later epoch, streamed vs memory.
Goals: peak memory in stream mode independent of the number of images; a later streamed epoch at
least as fast as the in-memory cache (ratio >= 1).

The images are small generated JPEGs (96x72, decoded at cache_size 72, image_size 64) so that 50,000
of them generate in seconds and fit in memory for the comparison; each size is a manifest.csv over
the first n files of one pool.

    python benchmarks/bench_scale.py [--quick] [--n 50000] [--sizes 5000,20000,50000]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PROJECT_ROOT, alternate, machine_info, offline, parser, report

CLASSES = ("Defective", "Non defective")
IMAGE_SIZE, CACHE_SIZE = 64, 72


def generate_pool(folder: Path, count: int, size: tuple[int, int] = (96, 72)) -> list[Path]:
    """`count` distinct small JPEGs: noise plus a dark bar for the first class, encoded once each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(60, 200, size=(size[1], size[0], 3), dtype=np.uint8)
        if i % 2 == 0:
            pixels[:, size[0] // 3 : size[0] // 3 + 8] = 10
        path = folder / f"{i:07d}.jpg"
        Image.fromarray(pixels).save(path, quality=85)
        paths.append(path)
    return paths


def write_manifest(root: Path, pool: list[Path], n: int) -> Path:
    """root/manifest.csv over the first `n` pool files: 80% Train, 20% Validation."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,split"]
    for i, path in enumerate(pool[:n]):
        split = "Validation" if i % 5 == 4 else "Train"
        lines.append(f"{path},{CLASSES[i % 2]},{split}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def start_training(
    root: Path, storage: str, stream_dir: Path, run_dir: Path
) -> tuple[subprocess.Popen, float]:
    """`train debug=fdr` in a child process (its output in run_dir.log)."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    args = [
        sys.executable,
        "-m",
        "railway_defect.train",
        "debug=fdr",
        "model=resnet18",
        "model.pretrained=false",
        f"data.root={root}",
        f"data.image_size={IMAGE_SIZE}",
        f"data.cache_size={CACHE_SIZE}",
        "data.batch_size=32",
        "data.audit=false",
        f"data.storage={storage}",
        f"data.stream_dir={stream_dir}",
        "trainer.accelerator=cpu",
        "logger=csv",
        "callbacks.review=null",
        f"hydra.run.dir={run_dir}",
    ]
    log = run_dir.with_suffix(".log")
    with log.open("w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    return process, time.perf_counter()


def anon_mb(pid: int) -> float:
    """Anonymous resident memory (MB) of a process: its RSS without file pages mapped from disk
    (LitData maps chunk files; the kernel can drop those pages), 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def finish_training(process: subprocess.Popen, started: float, log: Path) -> dict[str, float]:
    """Peak RSS (MB, the child's high-water mark from wait4), its peak anonymous memory (sampled
    every 20 ms while this waits: the child's own, not its build workers') and wall time of a
    started training run; the build time when it built the optimized form."""
    anon_peak = 0.0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        anon_peak = max(anon_peak, anon_mb(process.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - started
    output = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"train ({log.stem}) failed:\n{output[-4000:]}")
    built = [float(x) for x in re.findall(r"Built \S+ in ([0-9.]+) s", output)]
    # ru_maxrss: kilobytes on Linux
    return {"peak_mb": usage.ru_maxrss / 1024, "anon_mb": anon_peak, "wall_s": wall, "build_s": sum(built)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=50_000, help="images in the largest folder")
    p.add_argument("--sizes", default=None, help="comma-separated folder sizes (default 5k,20k,n)")
    p.add_argument("--epochs", type=int, default=1, help="later epochs timed per repeat and side")
    args = p.parse_args()
    offline()
    if args.quick:
        sizes = [80]  # one size: each training run is a process start (tens of seconds)
    elif args.sizes:
        sizes = sorted(int(s) for s in args.sizes.split(","))
    else:
        sizes = sorted({5_000, 20_000, args.n})
    repeats = args.repeats or (1 if args.quick else 3)

    print(machine_info())
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        pool = generate_pool(tmp_path / "pool", max(sizes))
        print(f"generated {len(pool)} JPEGs (96x72) in {time.perf_counter() - start:.1f} s")
        stream_dir = tmp_path / "stream"
        rows = []
        for n in sizes:
            root = write_manifest(tmp_path / f"data_{n}", pool, n)
            row: dict = {"images": n}
            runs = {}
            for storage in ("memory", "stream"):
                run_dir = tmp_path / f"run_{n}_{storage}"
                runs[storage] = (
                    *start_training(root, storage, stream_dir, run_dir),
                    run_dir.with_suffix(".log"),
                )
                if not args.quick:  # --quick: both at once (peaks are per process; wall times mean nothing)
                    row[storage] = finish_training(*runs[storage])
            for storage in ("memory", "stream"):
                if args.quick:
                    row[storage] = finish_training(*runs[storage])
            rows.append(row)
            print(
                f"images={n}: peak memory={row['memory']['peak_mb']:.0f} MB "
                f"stream={row['stream']['peak_mb']:.0f} MB (anonymous memory={row['memory']['anon_mb']:.0f} "
                f"stream={row['stream']['anon_mb']:.0f} MB); build of the optimized form "
                f"{row['stream']['build_s']:.1f} s ({n / max(row['stream']['build_s'], 1e-9):.0f} img/s); "
                f"train debug=fdr wall memory={row['memory']['wall_s']:.1f} s "
                f"stream={row['stream']['wall_s']:.1f} s"
            )
        small, large = rows[0], rows[-1]
        if len(rows) > 1:
            for key, what in (("peak_mb", "peak memory"), ("anon_mb", "peak anonymous memory")):
                growth = {
                    s: (large[s][key] - small[s][key]) / (large["images"] - small["images"]) * 1000
                    for s in ("memory", "stream")
                }
                print(
                    f"{what} growth per 1,000 images ({small['images']} -> {large['images']}): "
                    f"memory={growth['memory']:.1f} MB stream={growth['stream']:.1f} MB"
                )

        # a later epoch of the training loader at the largest size, both sides set up once
        sys.path.insert(0, str(PROJECT_ROOT))
        from railway_defect.data.datamodule import RailwayDataModule

        root = tmp_path / f"data_{large['images']}"
        modules = {}
        for storage in ("memory", "stream"):
            dm = RailwayDataModule.from_settings(
                root=root,
                image_size=IMAGE_SIZE,
                cache_size=CACHE_SIZE,
                batch_size=32,
                num_workers=0,
                audit=False,
                storage=storage,
                stream_dir=stream_dir,
            )
            dm.setup("fit")
            sum(len(y) for _, y in dm.train_dataloader())  # the first epoch (warm-up)
            modules[storage] = dm

        def later_epoch(storage: str) -> float:
            dm = modules[storage]
            start = time.perf_counter()
            count = sum(len(y) for _ in range(args.epochs) for _, y in dm.train_dataloader())
            return count / (time.perf_counter() - start)

        streamed, memory = alternate(lambda: later_epoch("stream"), lambda: later_epoch("memory"), repeats)
        print(f"later epoch at {large['images']} images (train split, batch 32, no workers):")
        report("stream", "stream later epoch", streamed, "memory later epoch", memory, "img/s")
        print("goal: stream peak memory growth ~0 MB per 1,000 images; ratio stream >= 1")
        print("json: " + json.dumps(rows))


if __name__ == "__main__":
    main()

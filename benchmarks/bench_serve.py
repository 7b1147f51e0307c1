"""The scoring service under load: starts `python -m railway_defect.serve` on 127.0.0.1 (a free
port) and sends N requests from C concurrent clients, good ones (1-4 photos) with bad ones mixed
in (empty, garbage, truncated, too large, too many files), each answered with its documented
code. Prints requests/s, latency p50/p95/p99 of the good requests, and the server's RSS at start
and after every 100 requests. Bounded: N requests and --max-seconds at most.

    python benchmarks/bench_serve.py [--requests 900 --concurrency 8 --backbone efficientnet_lite0]
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import PROJECT_ROOT, free_port, machine_info, parser, wait_until_up

# request kind -> the status code the service must answer
EXPECTED = {"good": 200, "empty": 400, "garbage": 415, "truncated": 415, "too_large": 413, "too_many": 413}
# one bad request in every BAD_EVERY
BAD_EVERY = 6


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_checkpoint(folder: Path, backbone: str, size: int) -> Path:
    """A model of the given backbone (random head, no download): latency and memory do not
    depend on what it learned."""
    import torch

    from railway_defect.models.contract import ModelContract
    from railway_defect.models.module import DefectClassifier

    contract = ModelContract.for_backbone(backbone, ["Defective", "Non defective"], "Defective", size)
    model = DefectClassifier(backbone, contract, pretrained=False)
    path = folder / "model.ckpt"
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    return path


def photos(count: int, size: tuple[int, int]) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
        out.append(buffer.getvalue())
    return out


def request_files(kind: str, index: int, images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    good = images[index % len(images)]
    parts = {
        "good": [good] * (1 + index % 4),
        "empty": [b""],
        "garbage": [os.urandom(2048)],
        "truncated": [good[: len(good) // 3]],
        "too_large": [b"\xff\xd8" + b"0" * (25 * 2**20)],
        "too_many": [good] * 40,
    }[kind]
    return [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(parts)]


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=900)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--max-seconds", type=float, default=900)
    args = p.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.backbone = min(args.requests, 60), 4, "resnet18"
    print(machine_info())
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(Path(tmp), args.backbone, 64 if args.quick else 224)
        port, images = free_port(), photos(8, (320, 240) if args.quick else (640, 480))
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "railway_defect.serve", f"ckpt_path={checkpoint}", f"port={port}"]
        command += ["device=cpu", "log_level=warning", f"hydra.run.dir={tmp}/serve"]
        server = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_until_up(f"{url}/health", server)
            print(f"server rss at start: {rss_mb(server.pid):.0f} MB")
            run_load(url, server.pid, images, args, httpx)
        finally:
            server.terminate()
            server.wait(timeout=60)


def run_load(url: str, pid: int, images: list[bytes], args, httpx) -> None:
    kinds = [k for k in EXPECTED if k != "good"]
    plan = [
        kinds[(i // BAD_EVERY) % len(kinds)] if i % BAD_EVERY == BAD_EVERY - 1 else "good"
        for i in range(args.requests)
    ]
    deadline = time.monotonic() + args.max_seconds
    client = httpx.Client(timeout=120)

    def send(i: int) -> tuple[str, int, float]:
        if time.monotonic() > deadline:
            return plan[i], -1, 0.0
        start = time.perf_counter()
        response = client.post(f"{url}/predict", files=request_files(plan[i], i, images))
        return plan[i], response.status_code, time.perf_counter() - start

    results, start = [], time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        for done, result in enumerate(pool.map(send, range(len(plan))), start=1):
            results.append(result)
            if done % 100 == 0:
                print(f"server rss after {done} requests: {rss_mb(pid):.0f} MB")
    elapsed = time.perf_counter() - start
    sent = [r for r in results if r[1] != -1]
    wrong = [(kind, code) for kind, code, _ in sent if code != EXPECTED[kind]]
    good = np.array([seconds for kind, code, seconds in sent if kind == "good"])
    rate, right = len(sent) / elapsed, len(sent) - len(wrong)
    print(f"requests: {len(sent)} of {len(plan)} in {elapsed:.1f} s ({rate:.1f} req/s), C={args.concurrency}")
    print(f"answered with the documented code: {right} of {len(sent)}; others: {sorted(set(wrong))}")
    p50, p95, p99 = np.percentile(good, [50, 95, 99])
    print(f"latency good requests (1-4 photos): p50={p50:.3f}s p95={p95:.3f}s p99={p99:.3f}s")
    print(f"server rss at the end: {rss_mb(pid):.0f} MB")
    print(f"ratio latency (p99 / p50): min={p99 / p50:.3f} median={p99 / p50:.3f} max={p99 / p50:.3f}")
    if wrong:
        raise SystemExit(f"{len(wrong)} requests got another code than documented")


if __name__ == "__main__":
    main()

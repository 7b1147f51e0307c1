"""Start a real TensorBoard on a run and talk to its HTTP data API: how the tests prove a run is
reviewable, and how scripts/review_screenshot.py gets a page to photograph."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# straight to 127.0.0.1, whatever HTTP(S)_PROXY says
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TensorBoard:
    """A running server: `get(path)` / `post(path, body)` return its JSON answers."""

    def __init__(self, url: str):
        self.url = url

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        with _OPENER.open(self.url + path, timeout=timeout) as response:
            return response.read()

    def get(self, path: str, timeout: float = 30) -> Any:
        return json.loads(self.get_bytes(path, timeout))

    def post(self, path: str, body: dict[str, Any], timeout: float = 30) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
            method="POST",
        )
        with _OPENER.open(request, timeout=timeout) as response:
            return json.loads(response.read())

    def wait_for(self, fetch: Callable[[], Any], ready: Callable[[Any], bool], timeout: float = 60) -> Any:
        """Call `fetch` until `ready(answer)` holds or `timeout` passes; the last answer.

        The server loads event files in the background, so its first answers may be empty."""
        deadline = time.monotonic() + timeout
        while True:
            answer = fetch()
            if ready(answer) or time.monotonic() > deadline:
                return answer
            time.sleep(0.5)


@contextmanager
def serve_tensorboard(
    logdir: str | Path, port: int | None = None, timeout: float = 90, cwd: str | Path | None = None
) -> Iterator[TensorBoard]:
    """`tensorboard --logdir LOGDIR --host 127.0.0.1 --port PORT` until the block ends, then stopped.

    `logdir` may be relative to `cwd` (the page shows it as given)."""
    port = port or free_port()
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--load_fast",
        "false",
        "--reload_interval",
        "2",
    ]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            server = TensorBoard(f"http://127.0.0.1:{port}")
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(
                        f"tensorboard exited with {process.returncode}: {log.read().decode()[-2000:]}"
                    )
                try:
                    server.get("/data/plugins_listing", timeout=5)
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"tensorboard did not answer on port {port} within {timeout} s"
                        ) from None
                    time.sleep(0.5)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

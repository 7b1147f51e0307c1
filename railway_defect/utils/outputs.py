"""Writing outputs so that a killed process or a full disk never leaves a half-written file.

Every output (metrics, reports, checkpoints, exports, prediction CSVs) goes through `atomic_path`:
the temporary file lives beside its destination, not in $TMPDIR, so the final rename never turns
into a copy across filesystems (a copy that a kill -9 or a full disk stops half-way)."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not every platform can open a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; when the block succeeds it is fsynced and renamed
    over `path`, when it fails (or is interrupted) it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if e.filename is None:  # say which output could not be written (a full disk: every write fails)
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """`open(path, mode)` through `atomic_path`: readers see the old file or the whole new one."""
    if mode.startswith("w") and "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files a killed writer of `path` left beside it (kill -9 runs no cleanup);
    only one process writes a given output, so any such file is an orphan."""
    path = Path(path)
    removed = []
    with contextlib.suppress(OSError):
        for stale in path.parent.glob(f"{glob.escape(_temporary_prefix(path))}*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                stale.unlink()
                removed.append(stale)
    return removed


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")

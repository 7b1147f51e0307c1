"""Fetch a zipped data folder when `data.url` is set and the root does not exist yet."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from railway_defect.utils.errors import UserError

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20


def archive_sha256(path: Path) -> str:
    """SHA-256 of a file read 1 MiB at a time: a data set's zip may be larger than the memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download_and_extract(url: str, root: Path, sha256: str | None = None, timeout: float = 60.0) -> None:
    """Download `url` (a zip), check its SHA-256 if given, and extract it to `root` atomically.

    A zip whose entries all sit in one top folder is unwrapped, so `root` holds the splits directly.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}-") as tmp:
        archive = Path(tmp) / "data.zip"
        log.info("Downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, archive.open("wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as e:
            raise UserError(
                f"Could not download data.url={url}: {e}. Check the URL or set data.root to a local folder."
            ) from e
        if sha256:
            digest = archive_sha256(archive)
            if digest.lower() != sha256.lower():
                raise UserError(
                    f"data.url {url} has SHA-256 {digest}, expected {sha256}: re-download or fix data.sha256."
                )
        extracted = Path(tmp) / "extracted"
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(extracted)
        except zipfile.BadZipFile as e:
            raise UserError(f"data.url {url} is not a zip archive ({e}).") from e
        entries = [p for p in extracted.iterdir() if p.name != "__MACOSX"]
        top = entries[0] if len(entries) == 1 and entries[0].is_dir() else extracted
        top.rename(root)
    log.info("Extracted data to %s", root)

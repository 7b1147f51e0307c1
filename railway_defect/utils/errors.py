"""One exception type for problems the user can fix: entry points print its message alone. A disk
that is full, read-only or not ours, or an output path that is a folder, is such a problem too."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# the disk is full, read-only or not ours: the user must act, a traceback would not help
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
PERMISSION_ERRORS = {errno.EACCES, errno.EPERM}
DISK_HINT = "free space or write to another disk (earlier outputs are intact)"


class UserError(Exception):
    """Bad input or configuration; the message says what to do."""


def disk_error(error: BaseException | None) -> OSError | None:
    """The full, read-only or foreign disk behind `error`, also where a library turned it into an
    error of its own (torch.save's writer raises a RuntimeError whose context is the OSError)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_ERRORS:
            return error
        error = error.__cause__ or error.__context__
    return None


def _free_space(filename: str | None) -> str:
    """` (N MB free)` on the disk of `filename`, when that can be read."""
    if not filename:
        return ""
    try:
        free = shutil.disk_usage(next(p for p in Path(filename).absolute().parents if p.exists())).free
    except (OSError, StopIteration):
        return ""
    return f" ({free / 2**20:.0f} MB free)"


def user_message(error: BaseException, hint: str = DISK_HINT) -> str | None:
    """The one line to show for a problem the user can fix, or None for a bug (show the traceback)."""
    if isinstance(error, UserError):
        return str(error)
    if (disk := disk_error(error)) is not None:
        where = disk.filename or "an output file"
        return f"cannot write {where}: {disk.strerror}{_free_space(disk.filename)}; {hint}."
    if isinstance(error, OSError) and error.errno in PERMISSION_ERRORS:
        return f"cannot access {error.filename or 'a file'}: {error.strerror}; check its permissions."
    if isinstance(error, OSError) and error.errno == errno.EISDIR:
        return f"cannot write {error.filename or 'an output file'}: it is a directory; give a file name."
    return None

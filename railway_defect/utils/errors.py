"""One exception type for problems the user can fix: entry points print its message alone. A disk
that is full, read-only or not ours, or an output path that is a folder, is such a problem too."""

from __future__ import annotations

import errno

# the disk is full, read-only or not ours: the user must act, a traceback would not help
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
PERMISSION_ERRORS = {errno.EACCES, errno.EPERM}
DISK_HINT = "free space or write to another disk (earlier outputs are intact)"


class UserError(Exception):
    """Bad input or configuration; the message says what to do."""


def user_message(error: BaseException, hint: str = DISK_HINT) -> str | None:
    """The one line to show for a problem the user can fix, or None for a bug (show the traceback)."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.errno in DISK_ERRORS:
        return f"cannot write {error.filename or 'an output file'}: {error.strerror}; {hint}."
    if isinstance(error, OSError) and error.errno in PERMISSION_ERRORS:
        return f"cannot access {error.filename or 'a file'}: {error.strerror}; check its permissions."
    if isinstance(error, OSError) and error.errno == errno.EISDIR:
        return f"cannot write {error.filename or 'an output file'}: it is a directory; give a file name."
    return None

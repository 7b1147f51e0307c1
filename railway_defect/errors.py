"""One exception type for problems the user can fix: entry points print its message alone."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class UserError(Exception):
    """Bad input or configuration; the message says what to do."""


def exit_on_user_error(run: Callable[[], T]) -> T:
    """Run an entry point's work; a UserError ends the process with its message as the last line."""
    try:
        return run()
    except UserError as e:
        log.error("%s", e)
        raise SystemExit(f"error: {e}") from None

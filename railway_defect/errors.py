"""One exception type for problems the user can fix: entry points print its message alone."""


class UserError(Exception):
    """Bad input or configuration; the message says what to do."""

"""The one exception type the CLI turns into a one-line error message."""


class UserError(Exception):
    """Bad input from the user (missing file, unknown option, ...): reported in one line, no traceback."""

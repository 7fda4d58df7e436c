"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """Reported as one line on stderr with exit code 2, never as a traceback."""

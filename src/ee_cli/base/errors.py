"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """Reported as one line on stderr with exit code 2, never as a traceback."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An error's first line (at most `limit` characters), or its type where it has no message."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__

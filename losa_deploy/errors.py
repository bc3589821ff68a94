"""The one exception type the CLI turns into ``error: ...`` on stderr and exit status 2.

Raise :class:`LosaError` for anything the user can fix (bad path, bad flag value, bad file); let
programming errors propagate as ordinary exceptions with their traceback.
"""


class LosaError(ValueError):
    """A user-facing problem, described in one line."""

    def __init__(self, message: str):
        # Keep it to one line: the CLI prints exactly this after "error: ".
        super().__init__(" ".join(str(message).split()))

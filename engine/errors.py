"""One exception type for every user-facing failure: the CLI prints its message on one line and exits 2."""


class DllamaError(Exception):
    """A problem the user can fix (bad file, bad flag, unreachable worker); the message says what and how."""

"""User-facing errors.

Anything a user can cause (bad flags, bad files, missing data, a busy database) raises
`HPSearchError`; the CLI prints its message as one line on stderr and exits non-zero.
Everything else is a bug and keeps its traceback (shown with ``--debug``).
"""


class HPSearchError(Exception):
    """An error caused by input or environment, with a message that says how to fix it."""


class DataError(HPSearchError):
    """A dataset could not be found, downloaded or parsed."""


class SpaceError(HPSearchError):
    """A search-space file is malformed or out of range."""

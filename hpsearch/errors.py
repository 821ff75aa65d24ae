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


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (raised by the CLI's signal handlers).

    A BaseException, like KeyboardInterrupt, so `except Exception` blocks do not swallow it; but
    not a KeyboardInterrupt, so click does not turn it into "Aborted!". `run_study` handles both.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

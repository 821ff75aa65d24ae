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


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a user: its first line, or its type when it has none."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class as_user_error:
    """Turn a `ValueError` raised inside the block into an `HPSearchError` (one line for the user).

    The library's constructors (devices, trainers, configs) raise ValueError for bad values; this
    is the one place where such a value becomes the user's error rather than a bug.

    >>> with as_user_error("bad config: "):   # doctest: +SKIP
    ...     TrainConfig(lr=-1)
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def __enter__(self) -> "as_user_error":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, ValueError):
            raise HPSearchError(self.prefix + first_line(exc, 300)) from None
        return False

"""Where studies live: storage URLs, opening them, SQLite's WAL and read-only modes, the file lock.

URLs: `sqlite:///path.db` (the default, `studies/hpsearch.db`), `journal:path.log` (Optuna's
journal file, for shared file systems without a server), and server databases
(`postgresql://...` through psycopg 3, the `[postgres]` extra; `mysql+pymysql://...`). A storage
that must already exist (`report`, `studies`, `dashboard`) is opened with `open_existing_storage`,
which never creates a file.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import optuna

try:
    import fcntl
except ImportError:  # Windows: no flock; workers there rely on the after-ask check, as on a server
    fcntl = None

from ..errors import HPSearchError, first_line
from .journal import RepairingJournalBackend

if TYPE_CHECKING:
    from .liveness import Liveness

T = TypeVar("T")
# SQLite: how long a connection waits for another process's write lock before "database is locked".
SQLITE_TIMEOUT_S = 60


# PostgreSQL goes through psycopg 3 (the [postgres] extra). A plain postgresql:// means psycopg2
# to SQLAlchemy 2.0 and psycopg 3 to 2.1, so it (and postgres://, which cloud consoles hand out and
# SQLAlchemy rejects) is pointed at psycopg 3 explicitly: the same URL works with either version.
PG_DIALECT = "postgresql+psycopg"
PG_EXTRA = "pip install 'psycopg[binary]', hpsearch's [postgres] extra"


def server_url(url: str) -> str:
    """The URL SQLAlchemy gets: `postgresql://` and `postgres://` name the driver hpsearch installs."""
    scheme, sep, rest = url.partition("://")
    return f"{PG_DIALECT}://{rest}" if sep and scheme in ("postgresql", "postgres") else url


def redact(url: str) -> str:
    """The storage URL without its password, for messages."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


def storage_file(url: str) -> Path | None:
    """The file behind a SQLite or journal URL; None for servers and in-memory SQLite."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        return None if path in ("", ":memory:") or path.startswith("file:") else Path(path)
    if url.startswith(("journal:", "journal+file:")):
        path = url.split(":", 1)[1].removeprefix("//")
        return Path(path) if path else None
    return None


def artifact_dir(url: str) -> Path:
    """Where the study's artifacts live: beside a SQLite/journal file, else studies/artifacts."""
    file = storage_file(url)
    return (file.parent if file is not None else Path("studies")) / "artifacts"


def _unwrapped(exc: BaseException) -> BaseException:
    """The database's own error: Optuna wraps it ("An exception is raised during the commit...")."""
    while isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def error_line(exc: BaseException) -> str:
    """One line for a storage error, naming its cause rather than Optuna's wrapper."""
    exc = _unwrapped(exc)
    if type(exc).__name__ == "PendingRollbackError" and exc.__context__ is not None:
        # "Can't reconnect until invalid transaction is rolled back": Optuna retried a query on a
        # session whose connection the server had closed; what happened is that first error.
        exc = exc.__context__
    return first_line(exc)


def server_went_away(exc: BaseException) -> bool:
    """The server closed the connection (shut down, restarted, the connection was killed): a
    rerun once it is back continues, unlike a refused password or a wrong host."""
    exc = _unwrapped(exc)
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    return bool(getattr(exc, "connection_invalidated", False)) or sqlstate.startswith("57P")  # 57P: shutdown


def is_storage_error(exc: BaseException) -> bool:
    """A failing database or file system, as opposed to a bug or a user error."""
    import sqlalchemy.exc

    return isinstance(exc, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, OSError))


class StudyLock:
    """Serializes the short critical sections of workers sharing one storage file: creating the
    study, asking a trial (count, ask, check), and failing dead workers' trials.

    An `flock` on `<storage file>-hpsearch-lock`: the kernel releases it when its holder dies, even
    by SIGKILL, so it can never be left stale. It is a separate file because closing any
    descriptor of the database file would drop SQLite's own POSIX locks in this process. Server
    databases get no lock (`exclusive` is False); `_ask` then checks after the fact. Re-entrant.
    """

    def __init__(self, url: str):
        file = storage_file(url)
        self.path = None if file is None or fcntl is None else file.with_name(file.name + "-hpsearch-lock")
        self._fd: int | None = None
        self._depth = 0

    @property
    def exclusive(self) -> bool:
        return self.path is not None

    def __enter__(self) -> "StudyLock":
        if self.path is None:
            return self
        if self._depth == 0:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise HPSearchError(f"cannot write in {self.path.parent}: {exc.strerror}; the folder of "
                                    f"the study storage must be writable") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        if self.path is None:
            return
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # releases the flock


_INIT_RACE_SIGNS = ("already exists", "duplicate", "locked", "unique constraint failed")


def _lost_init_race(exc: Exception) -> bool:
    """Whether creating a storage failed because another process was creating it at the same time."""
    text = str(exc).lower()
    return any(sign in text for sign in _INIT_RACE_SIGNS)


def _retry_racing_init(make: Callable[[], T]) -> T:
    """`make()`, tried again when it lost a race with another process opening the same storage.

    Workers starting at the same moment on a fresh server database race to create Optuna's
    tables ("already exists"). On SQLite the creation runs under the StudyLock, but workers that
    are already training write without it, and SQLite answers a read transaction that must become
    a write one with an immediate "database is locked" (its busy timeout does not apply there):
    the 4-worker test (tests/test_reliability.py) failed that way in a fresh-clone CI run. Two
    processes creating a new SQLite file can also both insert Optuna's schema version row
    ("UNIQUE constraint failed: alembic_version.version_num": the same test, another CI run).
    The loser waits and tries again; by then the tables and the row are there.
    """
    attempts = 6
    for attempt in range(attempts):
        try:
            return make()
        except Exception as exc:  # noqa: BLE001
            if attempt == attempts - 1 or not _lost_init_race(exc):
                raise
            time.sleep(0.25 * 2**attempt)  # 0.25 s ... 4 s: ~8 s in all
    raise AssertionError("unreachable")


def _sqlite_wal(path: Path) -> bool:
    """Switch a SQLite file to write-ahead logging (persistent; a no-op when it already is).

    Measured with 4 and 8 processes asking/reporting/telling as fast as they can: 1.3-2.5x the
    storage throughput of the default rollback journal, readers never wait for a writer, no
    "database is locked" either way (docs/reliability.md). WAL needs a local file system (shared
    memory beside the file); HPSEARCH_SQLITE_WAL=0 keeps the rollback journal, e.g. on NFS.
    """
    if os.environ.get("HPSEARCH_SQLITE_WAL", "1").strip() == "0":
        return False
    import sqlite3

    con = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)
    try:
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()
    finally:
        con.close()
    return bool(mode) and str(mode[0]).lower() == "wal"


def _sync_at_checkpoints(engine) -> None:
    """PRAGMA synchronous=NORMAL on every connection of a WAL database.

    In WAL mode that fsyncs at checkpoints instead of at every commit, and a crash of the process
    or the OS still cannot corrupt the file; only a power cut may lose the last commits. Optuna
    commits every report and user attr separately: measured with 60 TPE trials x 10 epochs on
    this project's 2-core machine, storage + sampling went from 98 to 69 ms per trial.
    """
    from sqlalchemy import event

    event.listen(engine, "connect", lambda con, _record: con.execute("PRAGMA synchronous=NORMAL"))
    engine.dispose()  # connections opened before the listener reconnect with it


def _open_sqlite_read_only(path: Path) -> optuna.storages.BaseStorage:
    """A SQLite study in a folder we cannot write (a read-only mount, someone else's folder).

    A WAL database needs its -shm file to be read; when nobody has it open, that file is gone and
    cannot be created here, so `mode=ro` fails and `immutable=1` (no locking; right for a folder
    nobody can write) reads it.
    """
    from urllib.parse import quote

    last: Exception | None = None
    for flags in ("mode=ro", "mode=ro&immutable=1"):
        try:
            return optuna.storages.RDBStorage(f"sqlite:///file:{quote(str(path))}?{flags}&uri=true",
                                              skip_table_creation=True)
        except Exception as exc:  # noqa: BLE001
            last = exc
    assert last is not None
    raise last


class _NoFallbackNoise(logging.Filter):
    """Optuna's RDB storage logs any OperationalError in a trial query as a warning with the SQL
    ("Caught an error from sqlalchemy: ... Falling back to a slower alternative", meant for too
    many IN variables). On a server that went away the fallback fails too and its error becomes
    the one line the user sees; the warning's several lines show with --debug only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (optuna.logging.get_verbosity() <= optuna.logging.INFO
                or not str(record.msg).startswith("Caught an error from sqlalchemy"))


def _open_server(url: str, heartbeat: dict) -> optuna.storages.BaseStorage:
    rdb_log = logging.getLogger("optuna.storages._rdb.storage")
    if not any(isinstance(f, _NoFallbackNoise) for f in rdb_log.filters):
        rdb_log.addFilter(_NoFallbackNoise())
    engine_kwargs: dict = {}
    if url.startswith(("postgresql", "mysql")):
        # An unreachable server fails in seconds, not after the TCP timeout; pre-ping replaces a
        # pooled connection that a server restart closed, so a worker whose epoch spans the restart
        # carries on instead of failing on its next report.
        engine_kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return _retry_racing_init(lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat))


def _no_driver(url: str) -> str:
    """Why a server URL cannot be opened without its driver, and what to install or write instead."""
    scheme = url.split(":", 1)[0]
    if scheme in ("postgresql", "postgres", PG_DIALECT):
        return f"no database driver for {scheme} ({PG_EXTRA})"
    if scheme.startswith("postgres"):  # another driver named explicitly, e.g. +psycopg2
        return (f"no database driver for {scheme}; hpsearch uses psycopg 3: write postgresql://... "
                f"({PG_EXTRA})")
    if scheme.startswith("mysql"):
        return f"no database driver for {scheme} (pip install pymysql and use mysql+pymysql://)"
    return f"no database driver for {scheme}"


def open_storage(url: str, liveness: Liveness | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL.

    SQLite gets its parent directory and a patient lock timeout. With `liveness` (the `run`
    path), RDB storages also get Optuna's heartbeat settings (journal storage uses
    `HEARTBEAT_ATTR` instead) and a SQLite file is switched to WAL; read-only users of a storage
    (`studies`, `report`) pass no `liveness` and change nothing.
    """
    heartbeat = {} if liveness is None else {"heartbeat_interval": liveness.interval,
                                              "grace_period": liveness.grace}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat_interval is "experimental"
            if url.startswith("sqlite:///"):
                path = storage_file(url)
                if path is not None and liveness is None and path.is_file() and not os.access(path.parent, os.W_OK):
                    return _open_sqlite_read_only(path)
                wal = False
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if liveness is not None:
                        wal = _retry_racing_init(lambda: _sqlite_wal(path))
                storage = _retry_racing_init(lambda: optuna.storages.RDBStorage(
                    url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}}, **heartbeat))
                if wal:
                    _sync_at_checkpoints(storage.engine)
                return storage
            if url.startswith(("journal:", "journal+file:")):
                file = storage_file(url)
                if file is None:
                    raise HPSearchError(f"journal storage {url!r} names no file; use journal:path/to/file.log")
                file.parent.mkdir(parents=True, exist_ok=True)
                return optuna.storages.JournalStorage(RepairingJournalBackend(str(file)))
            return _open_server(server_url(url), heartbeat)
    except HPSearchError:
        raise
    except OSError as exc:
        raise HPSearchError(f"cannot open storage {redact(url)!r}: {exc.strerror or exc}"
                            + (f": {exc.filename}" if exc.filename else "")) from None
    except ImportError:
        raise HPSearchError(f"cannot open storage {redact(url)!r}: {_no_driver(url)}") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors of every kind
        again = "; run the same command again once the server is back" if server_went_away(exc) else ""
        raise HPSearchError(f"cannot open storage {redact(url)!r}: {error_line(exc)}{again}") from None


def open_existing_storage(url: str) -> optuna.storages.BaseStorage:
    """Open a storage that must already exist (never creates a database file)."""
    if url in ("sqlite://", "sqlite:///", "sqlite:///:memory:"):
        raise HPSearchError(f"storage {url!r} is an in-memory database: there is nothing in it to read")
    file = storage_file(url)
    if file is not None and not file.is_file():
        # Absolute: the default storage is relative to the current directory, the usual surprise.
        raise HPSearchError(f"no study storage at {file.absolute()}; run `hpsearch run` in this directory first, "
                            f"or point at yours with --storage sqlite:////abs/path/hpsearch.db (four slashes)")
    if file is not None and url.startswith("sqlite") and file.stat().st_size == 0:
        # Opening it would create Optuna's tables in it: a reader must not write.
        raise HPSearchError(f"{file.absolute()} is empty, not a study database; run `hpsearch run --storage {url}` "
                            f"to start one there")
    return open_storage(url)

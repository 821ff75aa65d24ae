"""The Optuna side: storage, study, sampler, pruner, and the ask/report/prune/tell loop.

This is the only module that imports Optuna. It asks trials, turns their params into
`TrainConfig`s, and feeds them to a `PopulationTrainer`, which trains up to K of them at once.
After every epoch each member's validation accuracy is reported as the trial's intermediate
value; the pruner decides who leaves, and a newly asked trial takes the free slot, so the device
never waits for the slowest trial. TPE sees the running trials through the constant liar.

`--trials N` is the number of finished (complete or pruned) trials the *study* should hold,
whoever runs them: re-running the same command continues the study up to N and never redoes
finished trials, and several workers on one study (`--workers`, or separate `hpsearch run`
commands) share the N between them. Failed trials do not count.

Reliability (see README "Reliability"):

- A worker asks a trial only while finished + running < N, and checks after asking that its
  trial is among the first N live ones (so the count stays exact even where asking is not
  serialized). On SQLite and journal files the short critical sections (create the study, ask,
  fail dead trials) are serialized with an flock beside the storage file, which the kernel
  releases when a worker dies.
- Every running trial gets a heartbeat from a daemon thread (Optuna's RDB heartbeat table; a
  trial system attribute on journal storage). A RUNNING trial whose heartbeat is older than the
  grace period belongs to a dead worker: any worker marks it FAIL and queues its parameters as a
  WAITING trial, which the next `ask` takes first (up to MAX_RETRY times per trial).
- When a worker has nothing left to ask but the study is short of N because of trials running
  elsewhere, it waits for them to finish or to be declared dead, so a run ends with N finished.
- Ctrl-C / SIGTERM: the trials in training are marked FAIL ("interrupted") and queued again.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.trial import TrialState

try:
    import fcntl
except ImportError:  # Windows: no flock; workers there rely on the after-ask check, as on a server
    fcntl = None

from . import __version__
from .data import DATASET_NAMES, Dataset, load_dataset
from .errors import HPSearchError, Interrupted
from .space import Param, Space, load_space
from .train import GROUPINGS, PRECISIONS, TRAINER_VERSION, PopulationTrainer, TrainConfig, default_device

DEFAULT_STORAGE = "sqlite:///studies/hpsearch.db"
DEFAULT_STUDY = "hpsearch"
PRUNERS = ("median", "hyperband", "none")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Settings that define what a study measures: a resumed study must keep them.
_IDENTITY_ATTRS = ("dataset", "subset", "val_fraction", "epochs", "seed", "space")

# SQLite: how long a connection waits for another process's write lock before "database is locked".
SQLITE_TIMEOUT_S = 60
# Heartbeats: a beat every INTERVAL s from a thread; no beat for GRACE s means the worker is dead.
# The grace period is longer than SQLite's lock timeout, so a worker stuck behind a busy database
# is never mistaken for a dead one. Tests shorten both with the environment variables.
HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 90
MAX_RETRY = 3  # a dead or interrupted trial's parameters are retried up to this many times
HEARTBEAT_ATTR = "hpsearch:heartbeat"  # system attr (epoch seconds) on storages without RDB heartbeats
RUNS_ATTR = "hpsearch:runs"  # study system attr: how many runs have started (seeds their samplers)
WORKER_ATTR = "hpsearch:worker"  # trial system attr: "host:pid" of the process running the trial


@dataclass
class RunSettings:
    trials: int = 20
    timeout: float | None = None
    study: str = DEFAULT_STUDY
    storage: str = DEFAULT_STORAGE
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    space: str | None = None
    epochs: int = 20
    subset: int | None = None
    device: str = "auto"
    seed: int = 0
    pruner: str = "median"
    population: str | int = "auto"
    val_fraction: float = 0.1
    precision: str = "fp32"  # fp32 | tf32 | bf16 (GPU only); not part of the study's identity
    grouping: str = "auto"  # how population members share computations; see train.GROUPINGS

    def validate(self) -> None:
        if self.grouping != "auto" and self.grouping not in GROUPINGS:
            raise HPSearchError(f"unknown grouping {self.grouping!r}; choose auto or one of {', '.join(GROUPINGS)}")
        if self.precision not in PRECISIONS:
            raise HPSearchError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.trials < 1:
            raise HPSearchError(f"--trials must be at least 1, got {self.trials}")
        if self.epochs < 1:
            raise HPSearchError(f"--epochs must be at least 1, got {self.epochs}")
        if self.timeout is not None and not self.timeout > 0:
            raise HPSearchError(f"--timeout must be positive, got {self.timeout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise HPSearchError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.dataset not in DATASET_NAMES:
            raise HPSearchError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
        if self.pruner not in PRUNERS:
            raise HPSearchError(f"unknown pruner {self.pruner!r}; choose one of {', '.join(PRUNERS)}")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise HPSearchError(f"unknown device {self.device!r}; use auto, cpu or cuda[:N]")
        check_study_name(self.study)
        population_size(self.population, torch.device("cpu"), self.trials)  # validates


@dataclass(frozen=True)
class Liveness:
    """Heartbeat interval and grace period (seconds), and how often a lost trial is retried."""

    interval: int = HEARTBEAT_INTERVAL_S
    grace: int = GRACE_PERIOD_S
    max_retry: int = MAX_RETRY


def liveness_settings() -> Liveness:
    """Defaults, overridden by HPSEARCH_HEARTBEAT_INTERVAL / HPSEARCH_GRACE_PERIOD / HPSEARCH_MAX_RETRY."""

    def read(name: str, default: int, low: int) -> int:
        raw = os.environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise HPSearchError(f"{name} must be a whole number, got {raw!r}") from None
        if value < low:
            raise HPSearchError(f"{name} must be at least {low}, got {value}")
        return value

    interval = read("HPSEARCH_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL_S, 1)
    grace = read("HPSEARCH_GRACE_PERIOD", max(GRACE_PERIOD_S, 3 * interval), 1)
    if grace < 2 * interval:
        raise HPSearchError(f"HPSEARCH_GRACE_PERIOD ({grace}s) must be at least twice the heartbeat "
                            f"interval ({interval}s), or live workers would be declared dead")
    return Liveness(interval, grace, read("HPSEARCH_MAX_RETRY", MAX_RETRY, 0))


@dataclass
class TrialOutcome:
    """What the reporter is told when a trial ends."""

    number: int
    state: str  # "COMPLETE" or "PRUNED"
    value: float | None
    epochs: int
    seconds_per_epoch: float
    params: dict
    reason: str | None = None


@dataclass
class RunSummary:
    study: str
    storage: str
    trials_run: int
    finished_in_study: int
    best_value: float | None
    best_params: dict
    best_trial: int | None
    wall_seconds: float
    population: int
    device: str
    model_epochs: float  # one model over the whole training split = 1
    stopped_by: str  # "trials", "timeout"
    # where the wall time went: sampling (ask), training (incl. validation), storage (report/tell/attrs)
    time_shares: dict = field(default_factory=dict)
    model_epochs_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        self.model_epochs_per_second = self.model_epochs / self.wall_seconds if self.wall_seconds > 0 else 0.0


class Reporter:
    """Hooks for progress display; the CLI renders them with rich. All optional."""

    def start(self, settings: RunSettings, data: Dataset, already: int, population: int) -> None: ...
    def trial_finished(self, outcome: TrialOutcome, best: float | None, done: int) -> None: ...
    def note(self, message: str) -> None: ...  # recoveries, waiting for other workers, ...
    def interrupted(self, message: str) -> None: ...  # the run is stopping after a signal
    def finish(self, summary: RunSummary) -> None: ...


# ----------------------------------------------------------------------------------------------
# Storage and study


def check_study_name(name: str) -> None:
    # Study names become directory names under results/: no separators, no "..", no hidden files.
    if not STUDY_NAME_RE.fullmatch(name) or ".." in name:
        raise HPSearchError(f"invalid study name {name!r}: use letters, digits, '_', '-' and '.', "
                            f"starting with a letter or digit, without '..'")


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


def _first_line(exc: BaseException) -> str:
    # Optuna wraps database errors ("An exception is raised during the commit..."): say the cause.
    while isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


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


def _retry_storage_init(make: Callable[[], optuna.storages.BaseStorage]) -> optuna.storages.BaseStorage:
    # Workers starting at the same moment on a fresh server database race to create Optuna's
    # tables ("already exists"); the loser just tries again. (File storages are created under the
    # StudyLock instead.)
    for attempt in range(4):
        try:
            return make()
        except Exception as exc:  # noqa: BLE001
            text = str(exc).lower()
            if attempt == 3 or not ("already exists" in text or "duplicate" in text or "locked" in text):
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _sqlite_wal(path: Path) -> bool:
    """Switch a SQLite file to write-ahead logging (persistent; a no-op when it already is).

    Measured with 4 and 8 processes asking/reporting/telling as fast as they can: 1.3-2.5x the
    storage throughput of the default rollback journal, readers never wait for a writer, no
    "database is locked" either way (README, Reliability). WAL needs a local file system (shared
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
                        wal = _sqlite_wal(path)
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}}, **heartbeat)
                if wal:
                    _sync_at_checkpoints(storage.engine)
                return storage
            if url.startswith(("journal:", "journal+file:")):
                file = storage_file(url)
                if file is None:
                    raise HPSearchError(f"journal storage {url!r} names no file; use journal:path/to/file.log")
                file.parent.mkdir(parents=True, exist_ok=True)
                return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(file)))
            engine_kwargs = {}
            if url.startswith(("postgresql", "mysql")):
                # An unreachable server fails in seconds, not after the TCP timeout.
                engine_kwargs = {"connect_args": {"connect_timeout": 10}}
            return _retry_storage_init(lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat))
    except HPSearchError:
        raise
    except OSError as exc:
        raise HPSearchError(f"cannot open storage {redact(url)!r}: {exc.strerror or exc}"
                            + (f": {exc.filename}" if exc.filename else "")) from None
    except ImportError:
        scheme = url.split(":", 1)[0]
        hint = {"postgresql": "pip install psycopg2-binary", "mysql": "pip install pymysql and use mysql+pymysql://"}
        raise HPSearchError(f"cannot open storage {redact(url)!r}: no database driver for {scheme}"
                            + (f" ({hint[scheme]})" if scheme in hint else "")) from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors of every kind
        raise HPSearchError(f"cannot open storage {redact(url)!r}: {_first_line(exc)}") from None


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        # Five full trials before pruning anyone, and never before the 2nd epoch (steps are
        # 1-based epochs; MedianPruner may prune once step >= n_warmup_steps).
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def _identity(settings: RunSettings, space: Space) -> dict:
    return {"dataset": settings.dataset, "subset": settings.subset, "val_fraction": settings.val_fraction,
            "epochs": settings.epochs, "seed": settings.seed, "space": space.to_dict()}


def _check_identity(settings: RunSettings, existing: dict, identity: dict) -> None:
    for key in _IDENTITY_ATTRS:
        if existing.get(key) != identity[key]:
            flag = "--space" if key == "space" else f"--{key.replace('_', '-')}"
            raise HPSearchError(
                f"study {settings.study!r} was created with {key} = {json.dumps(existing.get(key))[:80]}, "
                f"not {json.dumps(identity[key])[:80]}; rerun with the same {flag} or pick a new --study")


def open_study(settings: RunSettings, space: Space, liveness: Liveness | None = None,
               lock: StudyLock | None = None) -> optuna.Study:
    """Create or load the study and check that it measures what `settings` say."""
    lock = lock or StudyLock(settings.storage)
    with lock:  # concurrent first runs on one file: one creates the tables, the study and its identity
        storage = open_storage(settings.storage, liveness)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                study = optuna.create_study(study_name=settings.study, storage=storage,
                                            pruner=make_pruner(settings.pruner, settings.epochs),
                                            direction="maximize", load_if_exists=True)
            identity = _identity(settings, space)
            existing = study.user_attrs
            # A study without trials measured nothing yet: it takes the new settings.
            if "dataset" in existing and study._storage.get_n_trials(study._study_id) > 0:
                _check_identity(settings, existing, identity)
            else:
                for key, value in identity.items():
                    study.set_user_attr(key, value)
                study.set_user_attr("data_dir", settings.data_dir)
                study.set_user_attr("hpsearch_version", __version__)
                study.set_user_attr("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                if not lock.exclusive:  # two different commands racing on a server: one of them loses
                    _check_identity(settings, study._storage.get_study_user_attrs(study._study_id), identity)
        except HPSearchError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise HPSearchError(f"cannot open study {settings.study!r} in {redact(settings.storage)}: "
                                f"{_first_line(exc)}") from None
    return study


def _seed_sampler(study: optuna.Study, settings: RunSettings, lock: StudyLock) -> None:
    """TPE seeded by (seed, how many runs this study has seen): a resumed run does not replay the
    first run's samples, and workers started together do not sample the same points."""
    with lock:
        runs = study._storage.get_study_system_attrs(study._study_id).get(RUNS_ATTR, 0)
        study._storage.set_study_system_attr(study._study_id, RUNS_ATTR, int(runs) + 1)
    salt = 0 if lock.exclusive else os.getpid()  # a server: the run counter may race
    study.sampler = optuna.samplers.TPESampler(
        seed=(settings.seed * 1_000_003 + int(runs) + salt * 7919) % 2**32, multivariate=True, constant_liar=True)


def list_studies(storage_url: str) -> list[dict]:
    storage = open_storage(storage_url)
    rows = []
    for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        trials = storage.get_all_trials(s._study_id, deepcopy=False)
        states = {st.name: sum(t.state == st for t in trials) for st in TrialState}
        complete = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        rows.append({
            "study": s.study_name, "dataset": s.user_attrs.get("dataset"), "trials": len(trials),
            "complete": states["COMPLETE"], "pruned": states["PRUNED"], "failed": states["FAIL"],
            "running": states["RUNNING"], "best": max(complete) if complete else None,
            "started": s.datetime_start.isoformat(timespec="seconds") if s.datetime_start else None,
        })
    return rows


# ----------------------------------------------------------------------------------------------
# Liveness: heartbeats, dead workers, retries


def _rdb_backend(study: optuna.Study):
    backend = getattr(study._storage, "_backend", study._storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


class Heartbeat:
    """Proof of life for this worker's running trials.

    A daemon thread writes a heartbeat for every registered trial each `interval` seconds: Optuna's
    heartbeat table on RDB storages, the `HEARTBEAT_ATTR` system attribute elsewhere. Training
    runs in the main thread and torch releases the GIL in its kernels, so however long an epoch
    takes, the beats keep coming; they stop only when the process dies or hangs.
    """

    def __init__(self, study: optuna.Study, interval: float):
        self.study, self.interval = study, interval
        rdb = _rdb_backend(study)
        self.native = rdb is not None and rdb.heartbeat_interval is not None
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpsearch-heartbeat", daemon=True)
        self.failures = 0

    def beat(self, trial_id: int) -> None:
        if self.native:
            self.study._storage.record_heartbeat(trial_id)
        else:
            self.study._storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def add(self, trial_id: int) -> None:
        self.beat(trial_id)  # at once: a trial must never be RUNNING without a heartbeat for long
        with self._lock:
            self._ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self._ids)
            for trial_id in ids:
                with self._lock:
                    if trial_id not in self._ids:
                        continue
                try:
                    self.beat(trial_id)
                except Exception:  # noqa: BLE001 - a busy or failing storage: the main loop will see it
                    self.failures += 1

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _rdb_trials_without_heartbeat(rdb, trial_ids: list[int]) -> set[int]:
    """RUNNING trials that never got a heartbeat row (their worker died right after asking)."""
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(rdb.scoped_session, True) as session:
            rows = session.query(models.TrialHeartbeatModel.trial_id).filter(
                models.TrialHeartbeatModel.trial_id.in_(trial_ids)).all()
        return set(trial_ids) - {row[0] for row in rows}
    except Exception:  # noqa: BLE001 - Optuna internals moved: rely on its own stale check only
        return set()


def stale_trials(study: optuna.Study, grace: float) -> list:
    """RUNNING trials whose worker has sent no heartbeat for `grace` seconds."""
    running = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    stale: set[int] = set()
    rdb = _rdb_backend(study)
    if rdb is not None and rdb.heartbeat_interval is not None:
        stale |= set(rdb._get_stale_trial_ids(study._study_id))  # heartbeat older than the grace (DB clock)
        unbeaten = _rdb_trials_without_heartbeat(rdb, [t._trial_id for t in running])
        now = datetime.now()
        stale |= {t._trial_id for t in running if t._trial_id in unbeaten and t.datetime_start is not None
                  and (now - t.datetime_start).total_seconds() > grace}
    else:
        now = time.time()
        for t in running:
            beat = t.system_attrs.get(HEARTBEAT_ATTR)
            last = beat if isinstance(beat, (int, float)) else (
                t.datetime_start.timestamp() if t.datetime_start is not None else None)
            if last is not None and now - last > grace:
                stale.add(t._trial_id)
    return [t for t in running if t._trial_id in stale]


def enqueue_retry(study: optuna.Study, frozen, max_retry: int) -> int | None:
    """Queue a failed trial's parameters as a WAITING trial (the next `ask` takes it first).

    Uses the system attrs of Optuna's RetryHeartbeatStaleTrialCallback ("failed_trial",
    "retry_history"), so its `retried_trial_number` works on hpsearch studies. Returns the new
    trial's number, or None when the trial has been retried `max_retry` times already.
    """
    history = list(frozen.system_attrs.get("retry_history", [])) + [frozen.number]
    if not frozen.params or len(history) > max_retry:
        return None
    system_attrs = {k: v for k, v in frozen.system_attrs.items() if k not in (HEARTBEAT_ATTR, WORKER_ATTR)}
    system_attrs.update(failed_trial=history[0], retry_history=history)
    template = optuna.trial.create_trial(
        state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
        user_attrs={"retry_of": frozen.number}, system_attrs=system_attrs)
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return study._storage.get_trial(trial_id).number


def recover_trials(study: optuna.Study, liveness: Liveness, lock: StudyLock) -> list[tuple[int, int | None]]:
    """Fail the trials of dead workers and queue their parameters again.

    Returns (failed trial number, retry trial number or None) pairs. Under the lock only one
    worker fails a given trial, so it is retried once.
    """
    out = []
    with lock:
        for frozen in stale_trials(study, liveness.grace):
            storage, tid = study._storage, frozen._trial_id
            try:
                storage.set_trial_user_attr(tid, "stop_reason", f"worker lost: no heartbeat for {liveness.grace}s")
                if not storage.set_trial_state_values(tid, TrialState.FAIL):
                    continue
            except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
                continue  # another worker got there first
            out.append((frozen.number, enqueue_retry(study, storage.get_trial(tid), liveness.max_retry)))
    return out


# ----------------------------------------------------------------------------------------------
# The search loop


def population_size(requested: str | int, device: torch.device, trials: int) -> int:
    """K members trained at once. auto: 1 on a CPU (no gain there), 32 on a GPU."""
    if requested == "auto":
        k = 32 if device.type == "cuda" else 1
    else:
        try:
            k = int(requested)
        except (TypeError, ValueError):
            raise HPSearchError(f"--population must be a positive integer or 'auto', got {requested!r}") from None
        if k < 1:
            raise HPSearchError(f"--population must be at least 1, got {k}")
    return max(1, min(k, trials))


def resolve_grouping(requested: str, device: torch.device) -> str:
    """auto: exact shapes on a CPU (padding is pure waste there: 5x slower for a mixed population
    measured with `hpsearch bench --mixed 8`), padded groups by batch size on a GPU (fewer groups,
    fewer launches; to be confirmed by `hpsearch bench --device cuda`)."""
    if requested != "auto":
        return requested
    return "batch" if device.type == "cuda" else "shape"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device}:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()}"


class _ActiveTrial:
    def __init__(self, trial: optuna.Trial, config: TrainConfig):
        self.trial = trial
        self.config = config
        self.epoch_seconds: list[float] = []
        self.curves: dict[str, list[float]] = {"train_loss": [], "train_acc": [], "val_loss": [], "val_acc": []}
        self.population: list[int] = []


def suggest(trial: optuna.Trial, param: Param):
    if param.kind == "categorical":
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.kind == "int":
        return trial.suggest_int(param.name, int(param.low), int(param.high), log=param.log,
                                 step=int(param.step) if param.step else 1)
    return trial.suggest_float(param.name, param.low, param.high, log=param.log, step=param.step)


def _config_for(trial: optuna.Trial, space: Space, epochs: int, seed: int) -> TrainConfig:
    params = {p.name: suggest(trial, p) for p in space.params}
    # A retried trial trains with the seed of the trial it retries: same run, same result.
    origin = trial.study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial", trial.number)
    trial_seed = (seed * 1_000_003 + int(origin)) % 2**31
    return TrainConfig.from_params({**space.fixed, **params}, epochs=epochs, seed=trial_seed)


def _finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _state_counts(study: optuna.Study) -> dict:
    """Trials per state, "finished" (complete + pruned) and "best" (value or None): one storage read."""
    counts: dict = {s.name: 0 for s in TrialState}
    best = None
    for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
        counts[t.state.name] += 1
        if t.state == TrialState.COMPLETE and t.value is not None and (best is None or t.value > best):
            best = t.value
    counts["finished"] = counts["COMPLETE"] + counts["PRUNED"]
    counts["best"] = best
    return counts


def _ask(study: optuna.Study, target: int, lock: StudyLock) -> optuna.Trial | None:
    """A new (or queued) trial if the study still needs one, else None.

    Asks only while finished + running < target, then checks that the new trial is among the first
    `target` live trials by number. Under the file lock nobody can interleave, so the check never
    fires; on a server database two workers may both ask for the last slot, and the higher number
    gives its trial up (FAIL, stop_reason "surplus", its queued params queued again).
    """
    with lock:
        live = study._storage.get_all_trials(study._study_id, deepcopy=False, states=LIVE)
        if len(live) >= target:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize"
            trial = study.ask()
        live = study._storage.get_all_trials(study._study_id, deepcopy=False, states=LIVE)
        if sum(t.number < trial.number for t in live) < target:
            return trial
        frozen = study._storage.get_trial(trial._trial_id)
        study._storage.set_trial_user_attr(trial._trial_id, "stop_reason", "surplus")
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        if "failed_trial" in frozen.system_attrs:  # a queued retry: put it back in the queue
            requeue = optuna.trial.create_trial(
                state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
                user_attrs={k: v for k, v in frozen.user_attrs.items() if k != "stop_reason"},
                system_attrs=frozen.system_attrs)
            study._storage.create_new_trial(study._study_id, template_trial=requeue)
        return None


def collapse_reason(val_accs: list[float], num_classes: int) -> str | None:
    """"accuracy collapsed ..." when a trial that was clearly learning is back at chance level.

    Clearly learning: validation accuracy once reached max(2 x chance, chance + 0.2). Collapsed:
    the last two epochs at or below chance + 0.05. (NaN/inf and exploding losses are caught by the
    trainer itself.)
    """
    if len(val_accs) < 3 or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    peak = max((v for v in val_accs[:-2] if math.isfinite(v)), default=0.0)
    floor = chance + 0.05
    if peak >= max(2 * chance, chance + 0.2) and all(not v > floor for v in val_accs[-2:]):  # NaN counts as low
        return (f"accuracy collapsed to {val_accs[-1]:.3f} at epoch {len(val_accs)} "
                f"(chance {chance:.3f}, peak {peak:.3f})")
    return None


def _storage_errors() -> tuple[type[BaseException], ...]:
    import sqlalchemy.exc

    return (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, OSError)


def _finished_elsewhere(study: optuna.Study, trial: optuna.Trial) -> bool:
    try:
        return study._storage.get_trial(trial._trial_id).state.is_finished()
    except Exception:  # noqa: BLE001
        return False


def run_study(settings: RunSettings, reporter: Reporter | None = None) -> RunSummary:
    """Run (or continue) a study until it holds `settings.trials` finished trials or time is up.

    Safe to run in several processes at once on one storage (see the module docstring). On
    KeyboardInterrupt or `Interrupted` the trials in training are marked FAIL and queued for a
    retry before the exception propagates; storage failures become an HPSearchError.
    """
    settings.validate()
    reporter = reporter or Reporter()
    space = load_space(settings.space)
    try:
        device = default_device(settings.device)
    except ValueError as exc:
        raise HPSearchError(str(exc)) from None
    liveness = liveness_settings()
    # The data first: a typo in --data-dir or --subset must not leave a study behind.
    data = load_dataset(settings.dataset, settings.data_dir, device, settings.val_fraction,
                        settings.subset, settings.seed)
    try:
        trainer = PopulationTrainer(data, precision=settings.precision,
                                    grouping=resolve_grouping(settings.grouping, device))
    except ValueError as exc:  # e.g. tf32 asked for on a CPU; before the study is touched
        raise HPSearchError(str(exc)) from None
    lock = StudyLock(settings.storage)
    study = open_study(settings, space, liveness, lock)
    K = population_size(settings.population, device, settings.trials)
    label = device_label(device)

    start = time.perf_counter()
    active: dict[int, _ActiveTrial] = {}
    pending: list[optuna.Trial] = []  # asked, not yet in `active`
    clock = {"sample": 0.0, "train": 0.0, "storage": 0.0}
    run_count = 0
    stopped_by = "trials"
    n_train = len(data.train_y)
    poll = max(0.5, min(liveness.interval / 2, 5.0))

    def out_of_time() -> bool:
        return settings.timeout is not None and time.perf_counter() - start >= settings.timeout

    def recover() -> None:
        for failed, retry in recover_trials(study, liveness, lock):
            again = f"its parameters are queued as trial {retry}" if retry is not None else \
                f"not retried again (retried {liveness.max_retry} times already)"
            reporter.note(f"trial {failed} lost its worker (no heartbeat for {liveness.grace}s): "
                          f"marked failed; {again}")

    beats = Heartbeat(study, liveness.interval)
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    try:
        with beats:
            _seed_sampler(study, settings, lock)
            study.set_user_attr("dataset_info", data.describe())
            recover()
            already = _finished_count(study)
            reporter.start(settings, data, already, K)
            next_recovery = time.monotonic() + liveness.interval
            waiting = False
            while True:
                if time.monotonic() >= next_recovery:
                    recover()
                    next_recovery = time.monotonic() + liveness.interval
                # Fill free slots while the study, counting every worker's running trials, needs more.
                while len(active) < K and not out_of_time():
                    t0 = time.perf_counter()
                    trial = _ask(study, settings.trials, lock)
                    if trial is None:
                        break
                    pending.append(trial)
                    beats.add(trial._trial_id)
                    study._storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, worker_id)
                    config = _config_for(trial, space, settings.epochs, settings.seed)
                    active[trial.number] = _ActiveTrial(trial, config)
                    pending.remove(trial)
                    trainer.add(trial.number, config)
                    clock["sample"] += time.perf_counter() - t0
                if not active:
                    if out_of_time():
                        stopped_by = "timeout"
                        break
                    counts = _state_counts(study)
                    if counts["finished"] >= settings.trials:
                        break
                    # The rest of the study is running in other workers: wait until those trials
                    # finish, or are declared dead and come back as retries that we then take.
                    if not waiting:
                        reporter.note(f"{counts['finished']} of {settings.trials} trials finished, "
                                      f"{counts['RUNNING']} running in other workers: waiting for them")
                        waiting = True
                    time.sleep(poll)
                    recover()
                    next_recovery = time.monotonic() + liveness.interval
                    continue
                waiting = False
                t0 = time.perf_counter()
                results = trainer.run_epoch()
                t1 = time.perf_counter()
                clock["train"] += t1 - t0
                for result in results:
                    at = active[result.key]
                    at.epoch_seconds.append(result.seconds)
                    at.population.append(result.group_size)
                    for name in at.curves:
                        at.curves[name].append(getattr(result, name))
                    trial = at.trial
                    try:
                        reason = result.diverged
                        if reason is None and math.isfinite(result.val_acc):
                            trial.report(result.val_acc, result.epoch)
                        if reason is None:
                            reason = collapse_reason(at.curves["val_acc"], data.num_classes)
                        if reason is None and not result.finished and (trial.should_prune() or out_of_time()):
                            reason = "pruned" if not out_of_time() else "timeout"
                        if reason is None and not result.finished:
                            continue
                        if result.key in trainer:
                            trainer.remove(result.key)
                        state = TrialState.COMPLETE if reason is None else TrialState.PRUNED
                        _record(trial, at, result.epoch, data, label, reason)
                        value = result.val_acc if state == TrialState.COMPLETE else None
                        study.tell(trial, value, state=state)
                    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
                        if not _finished_elsewhere(study, trial):
                            raise
                        # Another worker saw no heartbeat for the grace period, failed this trial and
                        # queued it again: drop our copy.
                        if result.key in trainer:
                            trainer.remove(result.key)
                        del active[result.key]
                        beats.discard(trial._trial_id)
                        reporter.note(f"trial {trial.number} was declared lost by another worker "
                                      f"(heartbeats late); dropped here, its retry runs instead")
                        continue
                    del active[result.key]
                    beats.discard(trial._trial_id)
                    run_count += 1
                    counts = _state_counts(study)
                    reporter.trial_finished(
                        TrialOutcome(trial.number, state.name, result.val_acc, result.epoch,
                                     sum(at.epoch_seconds) / len(at.epoch_seconds), trial.params, reason),
                        counts["best"], counts["finished"])
                clock["storage"] += time.perf_counter() - t1
    except BaseException as exc:
        interrupted = isinstance(exc, (KeyboardInterrupt, Interrupted))
        storage_failed = isinstance(exc, _storage_errors())
        reason = "interrupted" if interrupted else f"error: {_first_line(exc)[:120]}"
        lost, queued = [], []
        unfinished = {t.number: t for t in [*pending, *(at.trial for at in active.values())]}
        for trial in unfinished.values():
            # Best effort: if this fails, the heartbeats stop and a later run recovers the trial.
            try:
                study._storage.set_trial_user_attr(trial._trial_id, "stop_reason", reason)
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
                continue  # another worker already failed it (and queued it)
            except BaseException:  # noqa: BLE001 - a dead storage, or a second Ctrl-C: stop cleaning up
                break
            lost.append(trial.number)
            if interrupted or storage_failed:  # not the parameters' fault: run them again
                try:
                    if enqueue_retry(study, study._storage.get_trial(trial._trial_id), liveness.max_retry) is not None:
                        queued.append(trial.number)
                except BaseException:  # noqa: BLE001
                    break
        if interrupted:
            try:
                finished = _finished_count(study)
                where = f"{finished} of {settings.trials} trials finished"
            except BaseException:  # noqa: BLE001
                where = "finished trials are kept"
            what = (f"trial{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} marked failed"
                    + (" and queued to run again" if queued else "")) if lost else "no trial was running"
            message = f"interrupted: {what}; {where}; run the same command again to continue"
            exc.message = message  # type: ignore[attr-defined] - main() prints it
            reporter.interrupted(message)
            raise
        if storage_failed:
            raise HPSearchError(
                f"storage {redact(settings.storage)} failed during the run: {_first_line(exc)}; "
                f"finished trials are kept{' and ' + str(len(queued)) + ' running ones queued again' if queued else ''}; "
                f"fix it and run the same command again to continue") from exc
        raise

    wall = time.perf_counter() - start
    best_trial = _best_trial(study)
    summary = RunSummary(
        study=settings.study, storage=redact(settings.storage), trials_run=run_count,
        finished_in_study=_finished_count(study),
        best_value=best_trial.value if best_trial else None,
        best_params=best_trial.params if best_trial else {},
        best_trial=best_trial.number if best_trial else None, wall_seconds=wall, population=K,
        device=label, model_epochs=trainer.samples_trained / n_train, stopped_by=stopped_by,
        time_shares={k: round(v / wall, 4) for k, v in clock.items()} if wall > 0 else {},
    )
    reporter.finish(summary)
    return summary


def _record(trial: optuna.Trial, at: _ActiveTrial, epochs: int, data: Dataset, device: str,
            reason: str | None) -> None:
    config = at.config
    finite_acc = [v if math.isfinite(v) else -1.0 for v in at.curves["val_acc"]]
    attrs = {
        "epochs_run": epochs,
        "seconds_per_epoch": sum(at.epoch_seconds) / len(at.epoch_seconds),
        "param_count": config.model_spec(data).param_count(),
        "device": device,
        "seed": config.seed,
        "population": max(at.population),
        "train_loss": at.curves["train_loss"][-1],
        "train_acc": at.curves["train_acc"][-1],
        "val_loss": at.curves["val_loss"][-1],
        "best_val_acc": max(finite_acc),
        "best_epoch": 1 + finite_acc.index(max(finite_acc)),
        "curves": {k: [round(v, 6) if math.isfinite(v) else None for v in vs] for k, vs in at.curves.items()},
        "config": config.to_dict(),
        "stop_reason": reason or "completed",
        "versions": {"hpsearch": __version__, "trainer": TRAINER_VERSION, "torch": torch.__version__,
                     "optuna": optuna.__version__},
    }
    for key, value in attrs.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # NaN/inf do not survive JSON storage
        trial.set_user_attr(key, value)


def _best_trial(study: optuna.Study):
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


# ----------------------------------------------------------------------------------------------
# Several worker processes on one study (`hpsearch run --workers N`)


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_workers(requested: str | int, device: str) -> int:
    """auto: one worker per GPU when several are visible (and --device is auto or cuda), else 1."""
    if requested == "auto":
        gpus = _gpu_count() if device in ("auto", "cuda") else 0
        return gpus if gpus > 1 else 1
    try:
        n = int(requested)
    except (TypeError, ValueError):
        raise HPSearchError(f"--workers must be a positive integer or 'auto', got {requested!r}") from None
    if not 1 <= n <= 256:
        raise HPSearchError(f"--workers must be between 1 and 256, got {n}")
    return n


def worker_devices(device: str, workers: int) -> list[str]:
    """Worker i's --device: cuda:i round-robin over the GPUs for auto/cuda, else the given device."""
    if device in ("auto", "cuda"):
        gpus = _gpu_count()
        if gpus:
            return [f"cuda:{i % gpus}" for i in range(workers)]
        if device == "cuda":
            raise HPSearchError("--device cuda: no CUDA GPU is visible")
        return ["cpu"] * workers
    return [device] * workers


def _worker_argv(settings: RunSettings, device: str, debug: bool) -> list[str]:
    args = [sys.executable, "-m", "hpsearch"] + (["--debug"] if debug else []) + [
        "run", "--trials", str(settings.trials), "--study", settings.study, "--storage", settings.storage,
        "--dataset", settings.dataset, "--epochs", str(settings.epochs), "--device", device,
        "--seed", str(settings.seed), "--pruner", settings.pruner, "--population", str(settings.population),
        "--val-fraction", repr(settings.val_fraction), "--precision", settings.precision, "--grouping", settings.grouping, "--workers", "1"]
    for flag, value in (("--timeout", settings.timeout), ("--data-dir", settings.data_dir),
                        ("--space", settings.space), ("--subset", settings.subset)):
        if value is not None:
            args += [flag, str(value)]
    return args


def run_workers(settings: RunSettings, workers: int, *, debug: bool = False,
                echo: Callable[[str], None] = print, echo_err: Callable[[str], None] | None = None) -> int:
    """Run `workers` processes of `hpsearch run` on one study; returns the exit code.

    The parent checks everything first (settings, space, storage, study identity, dataset), so bad
    input gives one error line, not one per worker; then it starts the workers, each in its own
    session (a terminal Ctrl-C reaches only the parent, which forwards it once), relays their
    stderr without repeats, forwards SIGINT/SIGTERM, and reports the study when all have exited.
    Workers watch the parent and stop cleanly if it disappears.
    """
    echo_err = echo_err or (lambda line: print(line, file=sys.stderr, flush=True))
    settings.validate()
    if storage_file(settings.storage) is None and settings.storage.startswith("sqlite"):
        raise HPSearchError("--workers needs a storage every process can open: an in-memory SQLite "
                            "database is private to one process; use a file (sqlite:///studies/x.db)")
    space = load_space(settings.space)
    devices = worker_devices(settings.device, workers)
    open_study(settings, space, liveness_settings(), StudyLock(settings.storage))
    load_dataset(settings.dataset, settings.data_dir, "cpu", settings.val_fraction, settings.subset,
                 settings.seed)  # fails here, once, on bad data; downloads once if needed
    echo(f"study {settings.study}: {settings.trials} finished trials shared by {workers} workers "
         f"({', '.join(devices)})")

    threads = max(1, (os.cpu_count() or 1) // workers)
    procs: list[subprocess.Popen] = []
    seen: set[str] = set()
    seen_lock = threading.Lock()

    def relay(stream) -> None:
        for line in stream:
            line = line.rstrip("\n")
            with seen_lock:
                # the parent sums up interruptions itself; identical lines from several workers once
                if not line.strip() or line in seen or line.startswith("interrupted"):
                    continue
                seen.add(line)
            echo_err(line)

    relays = []
    signum = None
    try:
        for i, dev in enumerate(devices):
            env = {**os.environ, "HPSEARCH_WORKER": str(i), "HPSEARCH_WORKERS": str(workers),
                   "HPSEARCH_PARENT_PID": str(os.getpid())}
            if dev == "cpu":
                env.setdefault("OMP_NUM_THREADS", str(threads))
            proc = subprocess.Popen(_worker_argv(settings, dev, debug), env=env, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            procs.append(proc)
            relays.append(threading.Thread(target=relay, args=(proc.stderr,), daemon=True))
            relays[-1].start()
        while any(p.poll() is None for p in procs):
            try:
                for p in procs:
                    p.wait()
            except (Interrupted, KeyboardInterrupt) as exc:
                signum = getattr(exc, "signum", signal.SIGINT)
                for p in procs:
                    if p.poll() is None:
                        try:
                            os.kill(p.pid, signum)  # a second signal makes the workers skip cleanup
                        except ProcessLookupError:
                            pass
    finally:
        for p in procs:  # only if the parent itself is failing: do not leave workers behind
            if p.poll() is None and signum is None:
                p.terminate()
        for t in relays:
            t.join(timeout=5)

    codes = [p.returncode for p in procs]
    try:
        storage = open_storage(settings.storage)
        study = optuna.load_study(study_name=settings.study, storage=storage)
        counts = _state_counts(study)
        best = _best_trial(study)
    except Exception as exc:  # noqa: BLE001
        echo_err(f"error: cannot read the study after the run: {_first_line(exc)}")
        return 1
    best_text = f"best {best.value:.4f} (trial {best.number})" if best else "no complete trial yet"
    echo(f"study {settings.study}: {counts['finished']} of {settings.trials} trials finished "
         f"({counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed, "
         f"{counts['RUNNING']} running, {counts['WAITING']} queued); {best_text}")
    if signum is not None:
        echo_err(f"interrupted: workers stopped, their running trials marked failed and queued to run again; "
                 f"{counts['finished']} of {settings.trials} trials finished; run the same command again to continue")
        return 128 + signum
    def signal_name(code: int) -> str:
        try:
            return signal.Signals(-code if code < 0 else code - 128).name
        except ValueError:
            return f"exit {code}"

    killed = [f"worker {i} ({signal_name(c)})" for i, c in enumerate(codes)
              if c is not None and (c < 0 or c in (128 + signal.SIGINT, 128 + signal.SIGTERM))]
    if counts["finished"] >= settings.trials:
        if killed:
            echo_err(f"note: {', '.join(killed)} died; the others finished the study (its trials were retried)")
        return 0
    if all(c == 0 for c in codes):  # --timeout
        return 0
    if killed:
        echo_err(f"error: {', '.join(killed)} died; {counts['finished']} of {settings.trials} trials "
                 f"finished; run the same command again to continue")
    return next((c for c in codes if c and c > 0), 1)

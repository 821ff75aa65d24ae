"""Liveness: heartbeats for running trials, dead workers' trials failed and retried.

Every running trial gets a heartbeat from a daemon thread (Optuna's RDB heartbeat table; a
trial system attribute on journal storage). A RUNNING trial whose heartbeat is older than the
grace period belongs to a dead worker: any worker marks it FAIL and queues its parameters as a
WAITING trial, which the next `ask` takes first (up to `max_retry` times per chain of retries).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import optuna
from optuna.trial import TrialState

from ..errors import HPSearchError
from .schema import FAILED_TRIAL, HEARTBEAT, RETRY_HISTORY, WORKER, TrialAttr
from .storage import StudyLock

# A beat every INTERVAL s from a thread; no beat for GRACE s means the worker is dead. The grace
# period is longer than SQLite's lock timeout (60 s), so a worker stuck behind a busy database is
# never mistaken for a dead one. Tests shorten both with the environment variables.
HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 90
MAX_RETRY = 3  # a dead or interrupted trial's parameters are retried up to this many times


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


def _rdb_backend(study: optuna.Study):
    backend = getattr(study._storage, "_backend", study._storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


class Heartbeat:
    """Proof of life for this worker's running trials.

    A daemon thread writes a heartbeat for every registered trial each `interval` seconds: Optuna's
    heartbeat table on RDB storages, the `HEARTBEAT` system attribute elsewhere. Training
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
            self.study._storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())

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
            beat = t.system_attrs.get(HEARTBEAT)
            last = beat if isinstance(beat, (int, float)) else (
                t.datetime_start.timestamp() if t.datetime_start is not None else None)
            if last is not None and now - last > grace:
                stale.add(t._trial_id)
    return [t for t in running if t._trial_id in stale]


def not_retried(frozen, max_retry: int) -> str | None:
    """Why a failed trial is not queued again, or None if it is."""
    # An enqueued trial (a [[start]]) that died before sampling has no params yet, but Optuna keeps
    # its values in the "fixed_params" system attribute, which the retry inherits.
    if not (frozen.params or frozen.system_attrs.get("fixed_params")):
        return "it died before its parameters were sampled, so there is nothing to run again"
    if len(frozen.system_attrs.get(RETRY_HISTORY, [])) + 1 > max_retry:
        return f"retried {max_retry} times already"
    return None


def enqueue_retry(study: optuna.Study, frozen, max_retry: int) -> int | None:
    """Queue a failed trial's parameters as a WAITING trial (the next `ask` takes it first).

    Uses the system attrs of Optuna's RetryHeartbeatStaleTrialCallback (FAILED_TRIAL,
    RETRY_HISTORY), so its `retried_trial_number` works on hpsearch studies. Returns the new
    trial's number, or None when the trial has been retried `max_retry` times already.
    """
    if not_retried(frozen, max_retry) is not None:
        return None
    history = list(frozen.system_attrs.get(RETRY_HISTORY, [])) + [frozen.number]
    system_attrs = {k: v for k, v in frozen.system_attrs.items() if k not in (HEARTBEAT, WORKER)}
    system_attrs.update({FAILED_TRIAL: history[0], RETRY_HISTORY: history})
    template = optuna.trial.create_trial(
        state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
        user_attrs={TrialAttr.RETRY_OF: frozen.number,
                    **{k: v for k, v in frozen.user_attrs.items() if k == TrialAttr.START}},
        system_attrs=system_attrs)
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return study._storage.get_trial(trial_id).number


def recover_trials(study: optuna.Study, liveness: Liveness, lock: StudyLock) -> list[tuple[int, int | None, str]]:
    """Fail the trials of dead workers and queue their parameters again.

    Returns (failed trial number, retry trial number or None, why not retried) triples. Under the
    lock only one worker fails a given trial, so it is retried once.
    """
    out = []
    with lock:
        for frozen in stale_trials(study, liveness.grace):
            storage, tid = study._storage, frozen._trial_id
            try:
                storage.set_trial_user_attr(tid, TrialAttr.STOP_REASON, f"worker lost: no heartbeat for {liveness.grace}s")
                if not storage.set_trial_state_values(tid, TrialState.FAIL):
                    continue
            except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
                continue  # another worker got there first
            failed = storage.get_trial(tid)
            retry = enqueue_retry(study, failed, liveness.max_retry)
            out.append((frozen.number, retry, "" if retry is not None else not_retried(failed, liveness.max_retry)))
    return out

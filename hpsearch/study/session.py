"""The run loop's door to Optuna: one worker's session on a study.

`StudySession` turns the loop's few verbs into Optuna calls: `ask` a trial (its number and
`TrainConfig`), `report` an epoch, `should_prune`, `finish` with a state and a `TrialRecord`,
`abandon` what it holds when stopping, `recover` dead workers' trials, `counts` and `best`, and
`store_model` for the trials whose model a report will want (`wants_model`).

`--trials N` is the number of finished (complete or pruned) trials the *study* should hold,
whoever runs them. A worker asks only while finished + running < N, and checks after asking that
its trial is among the first N live ones (so the count stays exact even where asking is not
serialized). On SQLite and journal files the short critical sections (create the study, ask,
fail dead trials) are serialized with the `StudyLock`, which the kernel releases when a worker
dies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import optuna
from optuna.trial import TrialState

from .. import __version__
from ..config import RunSettings, resolve_sampler
from ..errors import HPSearchError
from ..space import Param, Space
from ..specs import TrainConfig
from .liveness import Heartbeat, Liveness, enqueue_retry, liveness_settings, recover_trials
from .pruners import make_pruner
from .schema import (FAILED_TRIAL, IDENTITY, METRIC, RUNS, WORKER, StudyAttr, TrialAttr, TrialRecord, foreign_reason,
                     set_study_attr, settled_study_attrs)
from .storage import StudyLock, error_line, is_storage_error, open_storage, redact
from .view import store_artifact

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
ASK_ATTEMPTS = 5  # a new trial that overtook a queued one is given up and the ask repeated


class TrialTaken(Exception):
    """Another worker saw no heartbeat for the grace period, failed this trial and queued it again."""


@dataclass(frozen=True)
class StudyCounts:
    """Trials per state, and the best value so far (None before the first complete trial)."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    best: float | None = None

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


@dataclass(frozen=True)
class AskedTrial:
    number: int
    config: TrainConfig
    params: dict  # the sampled values only (the space's fixed ones are in `config`)
    retry_of: int | None = None  # a retry: the number of the trial it runs again


@dataclass(frozen=True)
class BestTrial:
    number: int
    value: float
    params: dict


def suggest(trial: optuna.Trial, param: Param):
    """Sample one space parameter through Optuna's suggest API."""
    if param.kind == "categorical":
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.kind == "int":
        return trial.suggest_int(param.name, int(param.low), int(param.high), log=param.log,
                                 step=int(param.step) if param.step else 1)
    return trial.suggest_float(param.name, param.low, param.high, log=param.log, step=param.step)


# ----------------------------------------------------------------------------------------------
# Opening a study: create or load, and check that it measures what the settings say


def _identity(settings: RunSettings, space: Space) -> dict:
    return {key: space.to_dict() if key == StudyAttr.SPACE else getattr(settings, key) for key in IDENTITY}


def _shown(value) -> str:
    return "absent" if value is None else json.dumps(value)[:60]


def _space_difference(old, new) -> str:
    """The first few settings in which two stored spaces differ, as `fixed.schedule: absent -> "cosine"`."""
    old, new = old if isinstance(old, dict) else {}, new if isinstance(new, dict) else {}
    diffs = []
    for part in ("params", "fixed"):
        a, b = old.get(part) or {}, new.get(part) or {}
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                diffs.append(f"{part}.{name}: {_shown(a.get(name))} -> {_shown(b.get(name))}")
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


def _check_identity(settings: RunSettings, existing: dict, identity: dict) -> None:
    for key in IDENTITY:
        if existing.get(key) == identity[key]:
            continue
        if key == StudyAttr.SPACE:
            raise HPSearchError(
                f"study {settings.study!r} was created with another search space "
                f"({_space_difference(existing.get(key), identity[key])}); rerun with --space FILE holding "
                f"the study's space (or leave --space out to continue with it), or pick a new --study")
        raise HPSearchError(
            f"study {settings.study!r} was created with {key} = {json.dumps(existing.get(key))[:80]}, "
            f"not {json.dumps(identity[key])[:80]}; rerun with the same --{key.replace('_', '-')} "
            f"or pick a new --study")


def _write_identity(study: optuna.Study, settings: RunSettings, space: Space, identity: dict) -> None:
    attrs = {**identity, StudyAttr.FAMILY: "|".join(space.families), StudyAttr.DATA_DIR: settings.data_dir,
             StudyAttr.VERSION: __version__, StudyAttr.CREATED: time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for key, value in attrs.items():
        set_study_attr(study._storage, study._study_id, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "set_metric_names is experimental"
        study.set_metric_names([METRIC])  # the dashboard and trials_dataframe say val_accuracy, not "Objective 0"


def _refuse_foreign(study: optuna.Study, settings: RunSettings) -> None:
    """Never train into someone else's study (a minimize or multi-objective one, or other trials)."""
    # Trials first: hpsearch writes a study's identity before its first trial, so attributes read
    # after the count include it. Read the other way round, a worker joining a study a server
    # worker was creating saw no identity, then the creator's first trial: "not created by
    # hpsearch" (fresh-clone CI on PostgreSQL, 2026-12-02: one of three simultaneous starts).
    n_trials = study._storage.get_n_trials(study._study_id)
    reason = foreign_reason([d.name for d in study.directions], study.user_attrs, n_trials)
    if reason is not None:
        raise HPSearchError(f"study {settings.study!r} in {redact(settings.storage)} was not created by hpsearch "
                            f"({reason}); pick another --study")


def _enqueue_starts(study: optuna.Study, space: Space, exclusive: bool) -> None:
    """The space's [[start]] configurations as the first trials: ordinary, prunable trials that
    `ask` takes before sampling, marked with their index so reports can tell them apart."""
    if study._storage.get_n_trials(study._study_id) > 0:
        return  # queued by a worker that won the race to create the study
    for index, params in enumerate(space.starts, 1):
        study.enqueue_trial(params, user_attrs={TrialAttr.START: index})
    if not exclusive:  # a server database: a worker creating the study beside us may have queued them too
        _drop_duplicate_starts(study)


def _drop_duplicate_starts(study: optuna.Study) -> None:
    """Each start runs once: fail the waiting copies of a start that another copy runs (or ran) already,
    and all but the lowest-numbered waiting copy otherwise (a retry or a requeue is the one copy)."""
    storage = study._storage
    by_index: dict = {}
    for t in storage.get_all_trials(study._study_id, deepcopy=False):
        if TrialAttr.START in t.user_attrs and t.state != TrialState.FAIL:
            by_index.setdefault(t.user_attrs[TrialAttr.START], []).append(t)
    for copies in by_index.values():
        waiting = sorted((t for t in copies if t.state == TrialState.WAITING), key=lambda t: t.number)
        keep = 0 if len(waiting) < len(copies) else 1  # a copy is running or done: no waiting one is needed
        for t in waiting[keep:]:
            storage.set_trial_user_attr(t._trial_id, TrialAttr.STOP_REASON, "duplicate start")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def _start_count(study: optuna.Study) -> int:
    """How many distinct [[start]] configurations the study holds (its full-budget references)."""
    trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
    return len({t.user_attrs[TrialAttr.START] for t in trials if TrialAttr.START in t.user_attrs})


def _create_or_load(settings: RunSettings, storage) -> tuple[optuna.Study, bool]:
    """(study, created here). Creating is the atomic claim: a storage refuses a second study of one
    name (a unique key in a database, the order of the log in a journal), so exactly one of the
    workers started together creates it, and its settings are the study's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return optuna.create_study(study_name=settings.study, storage=storage, direction="maximize"), True
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(study_name=settings.study, storage=storage), False


def open_study(settings: RunSettings, space: Space, liveness: Liveness | None = None,
               lock: StudyLock | None = None) -> optuna.Study:
    """Create or load the study and check that it measures what `settings` say."""
    lock = lock or StudyLock(settings.storage)
    with lock:  # concurrent first runs on one file: one creates the tables, the study and its identity
        storage = open_storage(settings.storage, liveness)
        try:
            study, created = _create_or_load(settings, storage)
            _refuse_foreign(study, settings)
            identity = _identity(settings, space)
            # on a server the creator may still be writing (no file lock there): wait for it
            existing = None if created else settled_study_attrs(study._storage, study._study_id,
                                                                wait=not lock.exclusive)
            if existing is not None:  # whoever created the study fixed what it measures
                _check_identity(settings, existing, identity)
            else:
                _write_identity(study, settings, space, identity)
                if settings.start:
                    _enqueue_starts(study, space, lock.exclusive)
            study.pruner = make_pruner(settings.pruner, settings.epochs, _start_count(study))
        except HPSearchError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise HPSearchError(f"cannot open study {settings.study!r} in {redact(settings.storage)}: "
                                f"{error_line(exc)}") from None
    return study


# Random trials TPE takes before modelling, on top of the [[start]] trials. Optuna's default is
# 10 in all; with starts, TPE already holds good points, and its first model centres on the best
# start: a local search around what is known to work, measured by benchmarks/search.py.
RANDOM_AFTER_STARTS = 4


def make_sampler(name: str, seed: int, starts: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler for `--sampler` (see config.SAMPLERS), seeded; `starts`: the study's [[start]] trials."""
    name = resolve_sampler(name)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = starts + RANDOM_AFTER_STARTS if starts else 10
    if name == "gp":  # RunSettings.validate has checked that scipy is there
        # GPSampler counts COMPLETE trials only (pruned ones teach it nothing): with the default
        # pruner a 10-minute study has 3-4, so it samples at random that long (docs/benchmarks.md).
        return optuna.samplers.GPSampler(seed=seed, deterministic_objective=False, n_startup_trials=startup)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                      n_startup_trials=startup)


def _seed_sampler(study: optuna.Study, settings: RunSettings, lock: StudyLock) -> None:
    """The sampler seeded by (seed, how many runs this study has seen): a resumed run does not
    replay the first run's samples, and workers started together do not sample the same points.
    Which sampler and pruner a run used is recorded in the study."""
    with lock:
        runs = study._storage.get_study_system_attrs(study._study_id).get(RUNS, 0)
        study._storage.set_study_system_attr(study._study_id, RUNS, int(runs) + 1)
    salt = 0 if lock.exclusive else os.getpid()  # a server: the run counter may race
    seed = (settings.seed * 1_000_003 + int(runs) + salt * 7919) % 2**32
    study.sampler = make_sampler(settings.sampler, seed, _start_count(study))
    study.set_user_attr(StudyAttr.SAMPLER, resolve_sampler(settings.sampler))
    study.set_user_attr(StudyAttr.PRUNER, settings.pruner)


# ----------------------------------------------------------------------------------------------
# Asking


_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM held back (delivered right after) while a trial is created and registered.

    Measured: `--workers 2` interrupted by SIGTERM left one trial RUNNING in about 1 of 6 runs,
    the signal having landed between Optuna creating the trial and this session recording it.
    The handlers are swapped, not the signal mask: blocking the main thread's mask
    (pthread_sigmask) still let a signal in through another thread (torch's, the heartbeat's),
    whose C handler has Python run ours in the main thread anyway (the same test, ~1 in 10 runs).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous: dict[int, object] = {}
    try:  # swapped inside the try: a signal between two swaps must still restore the first
        for signum in _DEFERRED_SIGNALS:
            if signal.getsignal(signum) not in (signal.SIG_IGN, None):  # ignored, or not ours to swap
                previous[signum] = signal.signal(signum, lambda signum, frame: pending.append(signum))
        yield
    finally:
        _restore_handlers(previous)
        for signum in dict.fromkeys(pending):
            _deliver(signum, previous[signum])


def _restore_handlers(previous: dict[int, object]) -> None:
    """Put every handler back, even when a signal's own handler runs (and raises) between two
    restores (`signal.signal` runs pending handlers first); then raise what it raised."""
    raised = None
    for signum, handler in previous.items():
        while True:
            try:
                signal.signal(signum, handler)
                break
            except BaseException as exc:  # noqa: BLE001 - an interrupt: restore the rest, then raise it
                raised = raised or exc
    if raised is not None:
        raise raised


def _deliver(signum: int, handler) -> None:
    """What `signum` would have done without the deferral (raise, default action, or nothing)."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


def _ask(study: optuna.Study, target: float, lock: StudyLock,
         keep: Callable[[optuna.Trial], None] = lambda trial: None) -> optuna.Trial | None:
    """A new (or queued) trial if the study still needs one, else None.

    Asks only while finished + running < target, then checks the new trial against the others.
    Under the file lock nobody can interleave, so the checks never fire; on a server database:
    - two workers may both ask for the last slot: the higher number gives its trial up (FAIL,
      stop_reason "surplus", its queued params queued again);
    - a retry may be queued between Optuna looking for queued trials and creating a new one: the
      new trial gives itself up and the ask is repeated, so that the retry is not left WAITING
      behind a study that reached its target (seen once in CI with a SIGKILLed worker).
    `keep` registers (and samples) the trial before a Ctrl-C can land (see _signals_deferred).
    """
    with lock:
        for _ in range(ASK_ATTEMPTS):
            live = study._storage.get_all_trials(study._study_id, deepcopy=False, states=LIVE)
            if len(live) >= target:
                return None
            with _signals_deferred(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with optimize"
                trial = study.ask()
                others = study._storage.get_all_trials(study._study_id, deepcopy=False, states=(*LIVE, TrialState.WAITING))
                if any(t.state == TrialState.WAITING and t.number < trial.number for t in others):
                    _give_up_surplus(study, trial)  # it overtook a queued trial: ask again
                    continue
                if sum(t.number < trial.number for t in others) < target:
                    keep(trial)
                    return trial
                _give_up_surplus(study, trial)
                return None
        return None


def _give_up_surplus(study: optuna.Study, trial: optuna.Trial) -> None:
    frozen = study._storage.get_trial(trial._trial_id)
    study._storage.set_trial_user_attr(trial._trial_id, TrialAttr.STOP_REASON, "surplus")
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    if FAILED_TRIAL in frozen.system_attrs or TrialAttr.START in frozen.user_attrs:  # queued: queue it again
        requeue = optuna.trial.create_trial(
            state=TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
            user_attrs={k: v for k, v in frozen.user_attrs.items() if k != TrialAttr.STOP_REASON},
            system_attrs=frozen.system_attrs)
        study._storage.create_new_trial(study._study_id, template_trial=requeue)


def trial_seed(study_seed: int, number: int) -> int:
    """The training seed of trial `number` in a study run with `--seed study_seed`."""
    return (study_seed * 1_000_003 + number) % 2**31


def _config_for(trial: optuna.Trial, space: Space, epochs: int, seed: int) -> TrainConfig:
    params = {p.name: suggest(trial, p) for p in space.params}
    # A retried trial trains with the seed of the trial it retries: same run, same result.
    origin = trial.study._storage.get_trial_system_attrs(trial._trial_id).get(FAILED_TRIAL, trial.number)
    return TrainConfig.from_params({**space.fixed, **params}, epochs=epochs, seed=trial_seed(seed, int(origin)))


# ----------------------------------------------------------------------------------------------
# Reading counts


def _counts(study: optuna.Study) -> StudyCounts:
    """Trials per state and the best value: one storage read."""
    n = {s: 0 for s in TrialState}
    best = None
    for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
        n[t.state] += 1
        if t.state == TrialState.COMPLETE and t.value is not None and (best is None or t.value > best):
            best = t.value
    return StudyCounts(n[TrialState.COMPLETE], n[TrialState.PRUNED], n[TrialState.FAIL],
                       n[TrialState.RUNNING], n[TrialState.WAITING], best)


def _best(study: optuna.Study) -> BestTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    t = max(complete, key=lambda t: t.value)
    return BestTrial(t.number, t.value, t.params)


def read_outcome(storage_url: str, study_name: str) -> tuple[StudyCounts, BestTrial | None]:
    """The counts and best trial of a study, e.g. after `--workers` children have exited."""
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    return _counts(study), _best(study)


# ----------------------------------------------------------------------------------------------


class StudySession:
    """One worker's session: the trials it holds, their heartbeats, and the study's verbs.

    Open it (creating the study or checking its identity), then use it as a context manager
    while training: the heartbeat thread runs inside the `with`.
    """

    def __init__(self, settings: RunSettings, space: Space, liveness: Liveness | None = None):
        self.settings, self.space = settings, space
        self.liveness = liveness or liveness_settings()
        self.lock = StudyLock(settings.storage)
        self.study = open_study(settings, space, self.liveness, self.lock)
        self._trials: dict[int, optuna.Trial] = {}  # asked by this worker, not yet finished
        self._configs: dict[int, TrainConfig] = {}  # sampled in _keep, handed out by ask
        self._beats = Heartbeat(self.study, self.liveness.interval)
        self._worker = f"{socket.gethostname()}:{os.getpid()}"

    def __enter__(self) -> "StudySession":
        self._beats.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._beats.__exit__(*exc)

    def begin(self, dataset_info: dict) -> None:
        """Seed this run's sampler and record what the data looked like."""
        _seed_sampler(self.study, self.settings, self.lock)
        set_study_attr(self.study._storage, self.study._study_id, StudyAttr.DATASET_INFO, dataset_info)

    def ask(self) -> AskedTrial | None:
        """The next trial (number, config, sampled params), or None when the study needs no more."""
        trial = _ask(self.study, self.settings.trial_target, self.lock, keep=self._keep)
        if trial is None:
            return None
        self._beats.add(trial._trial_id)
        self.study._storage.set_trial_system_attr(trial._trial_id, WORKER, self._worker)
        return AskedTrial(trial.number, self._configs.pop(trial.number), dict(trial.params),
                          trial.user_attrs.get(TrialAttr.RETRY_OF))

    def _keep(self, trial: optuna.Trial) -> None:
        """Register a new trial and sample all of its parameters, with Ctrl-C/SIGTERM held back (we
        run inside _ask's _signals_deferred): an interrupted trial then always has its whole
        configuration, which its retry runs again. Measured: a SIGTERM mid-sampling left part of
        the parameters, and one right after registering left none (not retried, nothing to rerun);
        each in ~1 of 10 runs of the `--workers 2` interrupt test on a fast host. This runs under
        the StudyLock (SQLite and journal files only): workers sample one at a time, milliseconds
        for TPE, longer for the GP sampler on a big study; in exchange each sees the others'
        parameters when it samples."""
        self._trials[trial.number] = trial
        s = self.settings
        self._configs[trial.number] = _config_for(trial, self.space, s.epochs, s.seed)

    def report(self, number: int, epoch: int, value: float) -> None:
        with self._unless_taken(number):
            self._trials[number].report(value, epoch)

    def should_prune(self, number: int) -> bool:
        with self._unless_taken(number):
            return self._trials[number].should_prune()

    def finish(self, number: int, state: str, value: float | None, record: TrialRecord) -> None:
        """Record and tell a trial: state "COMPLETE" (with its value) or "PRUNED"."""
        trial = self._trials[number]
        with self._unless_taken(number):
            for key, attr in record.to_attrs().items():
                trial.set_user_attr(key, attr)
            self.study.tell(trial, value if state == "COMPLETE" else None, state=TrialState[state])
        self._release(number)

    def fail(self, number: int, reason: str) -> None:
        """Record a trial that cannot be trained here (FAIL with `reason`), not queued again."""
        trial = self._trials[number]
        with self._unless_taken(number):
            self.study._storage.set_trial_user_attr(trial._trial_id, TrialAttr.STOP_REASON, reason)
            self.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        self._release(number)

    def _release(self, number: int) -> None:
        trial = self._trials.pop(number)
        self._beats.discard(trial._trial_id)

    @contextmanager
    def _unless_taken(self, number: int) -> Iterator[None]:
        """Turns Optuna's "trial already finished" into `TrialTaken` when another worker failed it."""
        try:
            yield
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            trial = self._trials[number]
            try:
                taken = self.study._storage.get_trial(trial._trial_id).state.is_finished()
            except Exception:  # noqa: BLE001
                taken = False
            if not taken:
                raise
            self._release(number)
            raise TrialTaken(number) from None

    def abandon(self, reason: str, requeue: bool) -> tuple[list[int], list[int]]:
        """Fail every trial this worker holds (stop_reason `reason`), queueing their parameters again
        if `requeue`. Best effort: if the storage fails, the heartbeats stop and a later run
        recovers the rest. Returns (failed trial numbers, queued ones)."""
        lost, queued = [], []
        storage = self.study._storage
        for number, trial in list(self._trials.items()):
            try:
                storage.set_trial_user_attr(trial._trial_id, TrialAttr.STOP_REASON, reason)
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
                continue  # another worker already failed it (and queued it)
            except BaseException:  # noqa: BLE001 - a dead storage, or a second Ctrl-C: stop cleaning up
                break
            lost.append(number)
            try:
                if requeue and enqueue_retry(self.study, storage.get_trial(trial._trial_id),
                                             self.liveness.max_retry) is not None:
                    queued.append(number)
            except BaseException:  # noqa: BLE001
                break
        return lost, queued

    def recover(self) -> list[tuple[int, int | None, str]]:
        """Fail dead workers' trials and queue them again: (failed number, retry number or None,
        why not retried)."""
        return recover_trials(self.study, self.liveness, self.lock)

    error_line = staticmethod(error_line)
    is_storage_error = staticmethod(is_storage_error)

    def counts(self) -> StudyCounts:
        return _counts(self.study)

    def wants_model(self, number: int) -> bool:
        """Whether complete trial `number` is now the study's best, or its best [[start]]: the
        models a report tests (the report's choice, ties to the earlier trial as there)."""
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        starts = [t for t in complete if t.user_attrs.get(TrialAttr.START) is not None]
        return any(trials and max(trials, key=lambda t: t.value).number == number for trials in (complete, starts))

    def store_model(self, number: int, checkpoint: Path, note: Callable[[str], None]) -> None:
        """Store trial `number`'s checkpoint as a study artifact (what `report`, `export` and
        `predict --study` look for); when it cannot be stored, `note` says why."""
        store_artifact(self.study, self.study._storage, self.settings.storage, checkpoint, number, note)

    def best(self) -> BestTrial | None:
        return _best(self.study)

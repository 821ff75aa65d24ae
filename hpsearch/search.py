"""The search loop: fill free slots -> train one epoch -> settle each result -> tell the study.

Optuna-free: the loop talks to a `StudySession` (hpsearch.study, the one door to Optuna) and to
a `PopulationTrainer`, which trains up to K trials at once. After every epoch each member's
validation accuracy is reported; `judge` decides whether the trial trains on, completes, or is
pruned (diverged, collapsed, pruned by the pruner, out of time), and a newly asked trial takes the
free slot, so the device never waits for the slowest trial. A trial that completes as the study's
best, or its best [[start]], leaves its weights in the study (`_keep_model`): the report, export
and predict use them instead of training the configuration again.

`--trials N` counts finished trials in the whole study, all workers together (see
`study/session.py`). When this worker has nothing left to ask but the study is short of N
because of trials running elsewhere, it waits for them to finish or to be declared dead, so a run
ends with N finished. Ctrl-C / SIGTERM: the trials in training are marked FAIL ("interrupted")
and queued again; a failing storage does the same and becomes one line for the user.
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .checkpoint import save_checkpoint
from .config import RunSettings, device_label, population_size, resolve_device, resolve_grouping
from .data import Dataset, load_dataset
from .errors import HPSearchError, Interrupted, as_user_error, first_line
from .specs import TrainConfig, describe_shape
from .study import (COMPLETED, OPTUNA_VERSION, AskedTrial, StudySession, TrialRecord, TrialTaken, continue_settings,
                    liveness_settings, redact)
from .train import TRAINER_VERSION, EpochResult, PopulationTrainer
from .train.memory import is_out_of_memory, memory_refusal

CURVES = ("train_loss", "train_acc", "val_loss", "val_acc")
MAX_MEMORY_FAILURES = 20


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
    retry_of: int | None = None  # the trial whose parameters and seed this one runs again
    shape: str = ""  # the network, fixed settings included ("3x920 bn relu": batch norm is fixed by the space)


@dataclass(frozen=True)
class EpochStatus:
    """A trial still training after an epoch: for progress displays."""

    number: int
    epoch: int
    epochs: int  # its budget
    val_acc: float


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

    def start(self, settings: RunSettings, data: Dataset, already: int, population: int,
              best: float | None = None) -> None: ...
    def epochs_done(self, running: list[EpochStatus]) -> None: ...  # after each epoch of the trials training on
    def trial_finished(self, outcome: TrialOutcome, best: float | None, done: int) -> None: ...
    def note(self, message: str) -> None: ...  # recoveries, waiting for other workers, ...
    def interrupted(self, message: str) -> None: ...  # the run is stopping after a signal
    def finish(self, summary: RunSummary) -> None: ...


# ----------------------------------------------------------------------------------------------
# Decisions: pure functions of a trial's results


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


@dataclass(frozen=True)
class Verdict:
    state: str  # "COMPLETE" or "PRUNED"
    reason: str | None  # None for a complete trial


def judge(result: EpochResult, val_accs: list[float], num_classes: int, pruner_says_stop: Callable[[], bool],
          out_of_time: bool) -> Verdict | None:
    """What happens to a trial after an epoch; None: it trains on.

    Diverged or collapsed trials are pruned with their reason whatever the pruner thinks; a trial
    that reached its budget completes; otherwise the pruner is asked, and past --timeout the trial
    is cut short ("timeout"). Pruned trials are finished trials: they count towards --trials.
    """
    reason = result.diverged or collapse_reason(val_accs, num_classes)
    if reason is None and not result.finished:
        prune = pruner_says_stop()  # asked even when out of time, as the pruner keeps its own record
        if out_of_time:
            reason = "timeout"
        elif prune:
            reason = "pruned"
        else:
            return None
    return Verdict("COMPLETE" if reason is None else "PRUNED", reason)


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Running:
    """A trial in training: what it has shown so far."""

    asked: AskedTrial
    param_count: int
    epoch_seconds: list[float] = field(default_factory=list)
    population: list[int] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in CURVES})
    train_paths: list[str] = field(default_factory=list)  # per epoch: cuda-graph, eager, ...

    def add(self, result: EpochResult) -> None:
        self.epoch_seconds.append(result.seconds)
        self.train_paths.append(result.train_path)
        self.population.append(result.group_size)
        for name in CURVES:
            self.curves[name].append(getattr(result, name))

    @property
    def seconds_per_epoch(self) -> float:
        return sum(self.epoch_seconds) / len(self.epoch_seconds)

    def record(self, epochs: int, device: str, reason: str | None) -> TrialRecord:
        finite_acc = [v if math.isfinite(v) else -1.0 for v in self.curves["val_acc"]]
        config = self.asked.config
        return TrialRecord(
            epochs_run=epochs, seconds_per_epoch=self.seconds_per_epoch, param_count=self.param_count,
            device=device, seed=config.seed, population=max(self.population),
            train_loss=self.curves["train_loss"][-1], train_acc=self.curves["train_acc"][-1],
            val_loss=self.curves["val_loss"][-1], best_val_acc=max(finite_acc),
            best_epoch=1 + finite_acc.index(max(finite_acc)),
            curves={k: [round(v, 6) if math.isfinite(v) else None for v in vs] for k, vs in self.curves.items()},
            config=config.to_dict(), stop_reason=reason or COMPLETED,
            versions=_versions(),
            train_path=", then ".join(dict.fromkeys(self.train_paths)))  # one path, or each in order

    def history(self) -> list[dict]:
        """Per epoch: its number, the curves' values and its seconds (as a report's best.json)."""
        return [{"epoch": i + 1, **{name: self.curves[name][i] for name in CURVES}, "seconds": seconds}
                for i, seconds in enumerate(self.epoch_seconds)]


def _versions() -> dict:
    return {"hpsearch": __version__, "trainer": TRAINER_VERSION, "torch": torch.__version__, "optuna": OPTUNA_VERSION}


class SearchLoop:
    """Runs trials from a session on a trainer until the study is full or time is up.

    `session` and `trainer` are duck-typed (tests drive the loop with fakes): the session as
    `hpsearch.study.StudySession`, the trainer as `PopulationTrainer` (add, remove, `in`,
    run_epoch, model, samples_trained).
    """

    def __init__(self, settings: RunSettings, session, trainer, reporter: Reporter, *, population: int,
                 data: Dataset, device: str, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 memory_refusal: Callable[[TrainConfig], str | None] = lambda config: None):
        self.settings, self.session, self.trainer, self.reporter = settings, session, trainer, reporter
        self.memory_refusal = memory_refusal  # why a config cannot fit (train/memory.py), or None
        self.memory_failures = 0  # in a row: a space whose every config is too big must end the run
        self.population, self.data, self.device = population, data, device
        self.clock, self.sleep = clock, sleep
        self.running: dict[int, _Running] = {}
        self.time_spent = {"sample": 0.0, "train": 0.0, "storage": 0.0}
        self.trials_run = 0
        interval = session.liveness.interval
        self.poll_seconds = max(0.5, min(interval / 2, 5.0))
        self.start = self.next_recovery = 0.0
        self.waiting = False
        self.overtime_noted = False  # said once that time is up but no trial is complete yet

    def execute(self) -> RunSummary:
        """Run the study; on any exception, give up the trials in training first (see `_stop`)."""
        self.start = self.clock()
        try:
            with self.session:
                self.session.begin(self.data.describe())
                self._recover()
                counts = self.session.counts()
                self.reporter.start(self.settings, self.data, counts.finished, self.population, best=counts.best)
                stopped_by = self._loop()
        except BaseException as exc:
            self._stop(exc)
            raise
        summary = self._summary(stopped_by)
        self.reporter.finish(summary)
        return summary

    def _loop(self) -> str:
        while True:
            if self.clock() >= self.next_recovery:
                self._recover()
            self._fill_slots()
            if self.running:
                self.waiting = False
                self._train_epoch()
                continue
            stopped_by = self._idle()
            if stopped_by is not None:
                return stopped_by

    def _out_of_time(self) -> bool:
        timeout = self.settings.timeout
        return timeout is not None and self.clock() - self.start >= timeout

    def _cut_for_time(self) -> bool:
        """Past --timeout, trials in training are cut short, unless the study has no complete
        trial yet: until one completes they are not cut for time (the pruner may still stop them),
        so a short run still leaves a model to report (the default space's first start takes ~85 s
        on a 2-core CPU; --timeout 60 used to leave none)."""
        if not self._out_of_time():
            return False
        if self.session.counts().best is not None:
            return True
        if not self.overtime_noted:
            self.overtime_noted = True
            which = ", ".join(map(str, sorted(self.running)))
            several = len(self.running) > 1
            self.reporter.note(f"time is up, but the study has no complete trial yet: trial{'s' if several else ''} "
                               f"{which} go{'' if several else 'es'} on until one completes")
        return False

    def _fill_slots(self) -> None:
        """Ask trials while there is room, the study needs more (every worker counted), and time."""
        while len(self.running) < self.population and not self._out_of_time():
            t0 = self.clock()
            asked = self.session.ask()
            if asked is None:
                return
            refusal = self.memory_refusal(asked.config)
            if refusal is not None:
                self._failed_for_memory([asked.number], refusal, lambda: self.session.fail(asked.number, refusal))
                continue
            param_count = asked.config.model_spec(self.data).param_count()
            self.running[asked.number] = _Running(asked, param_count)
            self.trainer.add(asked.number, asked.config)
            if asked.retry_of is not None:
                self.reporter.note(f"trial {asked.number} retries trial {asked.retry_of} (same parameters and seed)")
            self.time_spent["sample"] += self.clock() - t0

    def _idle(self) -> str | None:
        """Nothing to train: stop, or wait for trials other workers are running."""
        if self._out_of_time():
            return "timeout"
        counts = self.session.counts()
        if counts.finished >= self.settings.trial_target:
            return "trials"
        # The rest of the study is running in other workers: wait until those trials finish, or
        # are declared dead and come back as retries that we then take.
        if not self.waiting:
            self.reporter.note(f"{self.settings.finished_text(counts.finished)} trials finished, "
                               f"{counts.running} running in other workers: waiting for them")
            self.waiting = True
        self.sleep(self.poll_seconds)
        self._recover()
        return None

    def _recover(self) -> None:
        liveness = self.session.liveness
        for failed, retry, why_not in self.session.recover():
            again = f"its parameters are queued as trial {retry}" if retry is not None else f"not retried: {why_not}"
            self.reporter.note(f"trial {failed} lost its worker (no heartbeat for {liveness.grace}s): "
                               f"marked failed; {again}")
        self.next_recovery = self.clock() + liveness.interval

    def _train_epoch(self) -> None:
        t0 = self.clock()
        try:
            results = self.trainer.run_epoch()
        except RuntimeError as exc:  # torch.OutOfMemoryError is one too
            if not is_out_of_memory(exc):
                raise
            self._out_of_memory(exc)
            return
        self.memory_failures = 0
        t1 = self.clock()
        self.time_spent["train"] += t1 - t0
        for result in results:
            self._settle(result)
        self.time_spent["storage"] += self.clock() - t1
        still = [EpochStatus(r.key, r.epoch, self.running[r.key].asked.config.epochs, r.val_acc)
                 for r in results if r.key in self.running]
        if still:
            self.reporter.epochs_done(still)

    def _settle(self, result: EpochResult) -> None:
        """Report one member's epoch; finish its trial if the verdict says so."""
        number, run = result.key, self.running[result.key]
        run.add(result)
        try:
            if result.diverged is None and math.isfinite(result.val_acc):
                self.session.report(number, result.epoch, result.val_acc)
            cut = not result.finished and self._cut_for_time()  # a trial at its budget completes anyway
            verdict = judge(result, run.curves["val_acc"], self.data.num_classes,
                            lambda: self.session.should_prune(number), cut)
            if verdict is None:
                return
            self._leave(number)
            value = result.val_acc if verdict.state == "COMPLETE" else None
            self.session.finish(number, verdict.state, value, run.record(result.epoch, self.device, verdict.reason))
        except TrialTaken:
            self._leave(number)
            self.reporter.note(f"trial {number} was declared lost by another worker "
                               f"(heartbeats late); dropped here, its retry runs instead")
            return
        self.trials_run += 1
        if verdict.state == "COMPLETE":
            self._keep_model(number, run, result.val_acc)
        counts = self.session.counts()
        outcome = TrialOutcome(number, verdict.state, result.val_acc, result.epoch, run.seconds_per_epoch,
                               run.asked.params, verdict.reason, run.asked.retry_of,
                               describe_shape(run.asked.config.to_dict()))
        self.reporter.trial_finished(outcome, counts.best, counts.finished)

    def _keep_model(self, number: int, run: _Running, value: float) -> None:
        """Store a complete trial's weights when it is the study's best or best start: `report`,
        `export` and `predict --study` then use the trial's own model, without training it again
        (after a 5-minute study on 2 CPU cores: 7 s for the report, against 112 s retraining the
        first MLP start; the tutorial CNN's retrain took 457 s). Best effort: whatever goes wrong
        here becomes a note and the study goes on (a model not kept is retrained by the report);
        a storage that failed fails the loop's next call, which says so."""
        def not_kept(why: str) -> None:
            self.reporter.note(f"trial {number}'s model was not kept: {why}; a report retrains it")

        try:
            if not self.session.wants_model(number):
                return
            model = self.trainer.model(number)  # it left the trainer in this epoch: still there
            with tempfile.TemporaryDirectory(prefix="hpsearch-model-") as tmp:
                path = save_checkpoint(Path(tmp) / "model.pt", model, classes=self.data.classes,
                                       image_shape=self.data.image_shape, meta=self._model_meta(number, run, value))
                self.session.store_model(number, path, not_kept)
        except Exception as exc:  # noqa: BLE001 - never worth a study; Ctrl-C/SIGTERM are BaseExceptions
            not_kept(exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc))

    def _model_meta(self, number: int, run: _Running, value: float) -> dict:
        """What a report checks before using a kept model instead of retraining it."""
        s = self.settings
        return {"study": s.study, "trial": number, "params": run.asked.params, "config": run.asked.config.to_dict(),
                "dataset": self.data.name, "dataset_info": self.data.describe(), "subset": s.subset,
                "val_fraction": s.val_fraction, "split_seed": s.seed, "trained_on": "train",
                "trained_by": "search", "device": self.device, "precision": s.precision,
                "population": max(run.population), "validation_accuracy": value, "history": run.history(),
                "versions": _versions()}

    def _out_of_memory(self, exc: RuntimeError) -> None:
        """The trials in training ran out of memory: fail them (not queued again: they would again)
        and go on with the study."""
        numbers = sorted(self.running)
        for number in numbers:
            self._leave(number)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        reason = f"out of memory: {first_line(exc, 160)}"
        self._failed_for_memory(numbers, reason, lambda: self.session.abandon(reason, requeue=False))

    def _failed_for_memory(self, numbers: list[int], reason: str, record: Callable[[], object]) -> None:
        record()
        which = f"trial{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"
        self.reporter.note(f"{which} failed, not trained further: {reason}")
        self.memory_failures += len(numbers)
        if self.memory_failures >= MAX_MEMORY_FAILURES:
            raise HPSearchError(f"{self.memory_failures} trials in a row did not fit in memory (last: {reason}); "
                                f"bound layer_size, num_layers, channels or batch_size in the search space")

    def _leave(self, number: int) -> None:
        if number in self.trainer:
            self.trainer.remove(number)
        self.running.pop(number, None)

    def _stop(self, exc: BaseException) -> None:
        """Fail (and, when it is not their fault, queue again) the trials in training, then say why."""
        interrupted = isinstance(exc, (KeyboardInterrupt, Interrupted))
        storage_failed = self.session.is_storage_error(exc)
        reason = "interrupted" if interrupted else f"error: {self.session.error_line(exc)[:120]}"
        lost, queued = self.session.abandon(reason, requeue=interrupted or storage_failed)
        if interrupted:
            message = _interrupted_message(lost, queued, self._finished_text())
            exc.message = message  # type: ignore[attr-defined] - main() prints it
            self.reporter.interrupted(message)
        elif storage_failed:
            also = f" and {len(queued)} running ones queued again" if queued else ""
            raise HPSearchError(
                f"storage {redact(self.settings.storage)} failed during the run: {self.session.error_line(exc)}; "
                f"finished trials are kept{also}; fix it and run the same command again to continue") from exc

    def _finished_text(self) -> str:
        try:
            return f"{self.settings.finished_text(self.session.counts().finished)} trials finished"
        except BaseException:  # noqa: BLE001 - a dead storage, or a second Ctrl-C
            return "finished trials are kept"

    def _summary(self, stopped_by: str) -> RunSummary:
        wall = self.clock() - self.start
        best = self.session.best()
        return RunSummary(
            study=self.settings.study, storage=redact(self.settings.storage), trials_run=self.trials_run,
            finished_in_study=self.session.counts().finished,
            best_value=best.value if best else None, best_params=best.params if best else {},
            best_trial=best.number if best else None, wall_seconds=wall, population=self.population,
            device=self.device, model_epochs=self.trainer.samples_trained / len(self.data.train_y),
            stopped_by=stopped_by,
            time_shares={k: round(v / wall, 4) for k, v in self.time_spent.items()} if wall > 0 else {})


def _interrupted_message(lost: list[int], queued: list[int], where: str) -> str:
    if lost:
        what = (f"trial{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} marked failed"
                + (" and queued to run again" if queued else ""))
    else:
        what = "no trial was running"
    return f"interrupted: {what}; {where}; run the same command again to continue"


def run_study(settings: RunSettings, reporter: Reporter | None = None) -> RunSummary:
    """Run (or continue) a study until it holds `settings.trials` finished trials or time is up.

    Safe to run in several processes at once on one storage. On KeyboardInterrupt or
    `Interrupted` the trials in training are marked FAIL and queued for a retry before the
    exception propagates; storage failures become an HPSearchError.
    """
    settings.validate()
    settings, space = continue_settings(settings)  # flags left out: the existing study's values
    with as_user_error():
        device = resolve_device(settings.device)
    liveness = liveness_settings()
    # The data first: a typo in --data-dir or --subset must not leave a study behind.
    data = load_dataset(settings.dataset, settings.data_dir, device, settings.val_fraction,
                        settings.subset, settings.seed)
    reporter = reporter or Reporter()
    with as_user_error():  # e.g. tf32 asked for on a CPU; before the study is touched
        trainer = PopulationTrainer(data, precision=settings.precision,
                                    grouping=resolve_grouping(settings.grouping, device), note=reporter.note)
    session = StudySession(settings, space, liveness)
    loop = SearchLoop(settings, session, trainer, reporter,
                      population=population_size(settings.population, device, settings.trial_target),
                      data=data, device=device_label(device),
                      memory_refusal=lambda config: memory_refusal(config.model_spec(data), config.batch_size,
                                                                   data.train_x.device))
    return loop.execute()

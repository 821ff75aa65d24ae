"""The run loop's decisions against a fake session and a fake trainer: no storage, no training.

Each test fails when one decision changes: a pruned trial recorded as complete, a diverged one
reported to the pruner, a timeout not cutting a trial short, a trial another worker took still
being told, an interrupt not queuing the trials in training again, ...
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from hpsearch.config import RunSettings
from hpsearch.errors import HPSearchError, Interrupted
from hpsearch.models import model_from_spec
from hpsearch.search import Reporter, SearchLoop, Verdict, judge
from hpsearch.specs import TrainConfig
from hpsearch.study import AskedTrial, BestTrial, StudyCounts, TrialTaken
from hpsearch.train import EpochResult


class FakeSession:
    """A study in memory: `target` trials; records what the loop tells it."""

    def __init__(self, target: int, epochs: int = 4, prune_at: dict | None = None, taken: set | None = None,
                 running_elsewhere: int = 0):
        self.liveness = SimpleNamespace(interval=10, grace=90, max_retry=3)
        self.target, self.epochs = target, epochs
        self.prune_at = prune_at or {}  # trial number -> first epoch at which the pruner says stop
        self.taken = taken or set()  # trials another worker has failed
        self.running_elsewhere = running_elsewhere
        self.open: dict[int, int] = {}  # trial -> last reported epoch
        self.told: dict[int, tuple] = {}  # trial -> (state, value, record)
        self.reports: list[tuple] = []
        self.abandoned: tuple | None = None
        self.failed: dict[int, str] = {}
        self.stored: dict[int, dict] = {}  # trial -> the meta of the model kept for it
        self.next_number = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def begin(self, dataset_info):
        pass

    def ask(self):
        if len(self.told) + len(self.open) + self.running_elsewhere >= self.target:
            return None
        n = self.next_number
        self.next_number += 1
        self.open[n] = 0
        return AskedTrial(n, TrainConfig(epochs=self.epochs, seed=n), {"lr": 0.001 * (n + 1)})

    def report(self, number, epoch, value):
        if number in self.taken:
            self.open.pop(number)
            raise TrialTaken(number)
        assert math.isfinite(value)
        self.reports.append((number, epoch, value))
        self.open[number] = epoch

    def should_prune(self, number):
        return self.open[number] >= self.prune_at.get(number, math.inf)

    def finish(self, number, state, value, record):
        self.told[number] = (state, value, record)
        self.open.pop(number)

    def abandon(self, reason, requeue):
        lost = sorted(self.open)
        self.abandoned = (reason, lost, lost if requeue else [])
        for number in lost:
            self.open.pop(number)
            self.failed[number] = reason
        return lost, (lost if requeue else [])

    def fail(self, number, reason):
        self.open.pop(number)
        self.failed[number] = reason

    def recover(self):
        return []

    def counts(self):
        states = [s for s, _, _ in self.told.values()]
        values = [v for s, v, _ in self.told.values() if s == "COMPLETE"]
        return StudyCounts(complete=states.count("COMPLETE"), pruned=states.count("PRUNED"),
                           running=len(self.open) + self.running_elsewhere, best=max(values, default=None))

    def best(self):
        complete = [(v, n) for n, (s, v, _) in self.told.items() if s == "COMPLETE"]
        if not complete:
            return None
        value, number = max(complete)
        return BestTrial(number, value, {})

    def wants_model(self, number):
        """As the real session (no [[start]]s here): the best complete trial, ties to the earlier."""
        complete = [(v, -n) for n, (s, v, _) in self.told.items() if s == "COMPLETE"]
        return bool(complete) and -max(complete)[1] == number

    def store_model(self, number, checkpoint, note):
        self.stored[number] = torch.load(checkpoint, weights_only=True)["meta"]

    error_line = staticmethod(lambda exc: str(exc))
    is_storage_error = staticmethod(lambda exc: isinstance(exc, OSError))


class FakeTrainer:
    """Members follow scripted validation accuracies; `curve(number, epoch)` gives one."""

    def __init__(self, curve=lambda number, epoch: 0.5 + 0.01 * epoch, diverge: dict | None = None,
                 fail_on_epoch: int | None = None, error: BaseException | None = None):
        self.curve, self.diverge = curve, diverge or {}
        self.members: dict[int, list] = {}  # number -> [config, epoch]
        self.configs: dict[int, TrainConfig] = {}  # every member ever added
        self.samples_trained = 0
        self.epochs_run = 0
        self.fail_on_epoch, self.error = fail_on_epoch, error

    def add(self, key, config):
        assert key not in self.members
        self.members[key] = [config, 0]
        self.configs[key] = config

    def model(self, key):
        return model_from_spec(self.configs[key].model_spec(DATA))

    def remove(self, key):
        del self.members[key]

    def __contains__(self, key):
        return key in self.members

    def run_epoch(self):
        self.epochs_run += 1
        if self.epochs_run == self.fail_on_epoch:
            raise self.error
        results = []
        for key, member in list(self.members.items()):
            member[1] += 1
            config, epoch = member
            diverged = f"non-finite loss at epoch {epoch}" if self.diverge.get(key) == epoch else None
            val = float("nan") if diverged else self.curve(key, epoch)
            finished = diverged is None and epoch >= config.epochs
            results.append(EpochResult(key, epoch, 0.5, 0.8, 0.4, val, 1.0, len(self.members), finished, diverged))
            self.samples_trained += 100
            if finished or diverged:
                self.remove(key)
        return results


class Recorder(Reporter):
    def __init__(self):
        self.notes, self.finished, self.messages, self.epochs, self.started = [], [], [], [], None

    def start(self, settings, data, already, population, best=None):
        self.started = (already, best)

    def epochs_done(self, running):
        self.epochs.append([(r.number, r.epoch, r.epochs, r.val_acc) for r in running])

    def note(self, message):
        self.notes.append(message)

    def trial_finished(self, outcome, best, done):
        self.finished.append(outcome)

    def interrupted(self, message):
        self.messages.append(message)


def test_a_trial_line_names_the_fixed_settings_of_its_network():
    """The space fixes batch norm (not sampled): the trial's line still says "bn"."""
    session = FakeSession(target=1, epochs=2)
    asked = session.ask
    session.ask = lambda: (lambda a: a and AskedTrial(a.number, TrainConfig(
        num_layers=3, layer_size=920, batch_norm=True, epochs=2, seed=a.number), a.params))(asked())
    loop, reporter = make_loop(session, FakeTrainer())
    loop.execute()
    assert [o.shape for o in reporter.finished] == ["3x920 bn relu"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


DATA = SimpleNamespace(name="fake", classes=tuple(map(str, range(10))), num_classes=10, in_features=784,
                       image_shape=(28, 28), mean=0.0, std=1.0, train_y=list(range(100)), describe=lambda: {"train": 100})


def make_loop(session, trainer, population=2, timeout=None, clock=None, memory_refusal=lambda config: None):
    settings = RunSettings(trials=session.target, epochs=session.epochs, timeout=timeout, storage="sqlite:///x.db")
    clock = clock or Clock()
    reporter = Recorder()
    loop = SearchLoop(settings, session, trainer, reporter, population=population, data=DATA, device="cpu:test",
                      clock=clock, sleep=clock.sleep, memory_refusal=memory_refusal)
    return loop, reporter


def test_complete_and_pruned_trials_are_told_with_their_state_value_and_record():
    session = FakeSession(target=3, epochs=4, prune_at={1: 2})
    loop, reporter = make_loop(session, FakeTrainer())
    summary = loop.execute()
    assert summary.stopped_by == "trials" and summary.finished_in_study == 3 and summary.trials_run == 3
    state, value, record = session.told[0]
    assert (state, value) == ("COMPLETE", pytest.approx(0.54)) and record.stop_reason == "completed"
    assert record.epochs_run == 4 and record.config["seed"] == 0 and record.best_epoch == 4
    state, value, record = session.told[1]
    assert (state, value, record.stop_reason, record.epochs_run) == ("PRUNED", None, "pruned", 2)
    assert [r for r in session.reports if r[0] == 1] == [(1, 1, pytest.approx(0.51)), (1, 2, pytest.approx(0.52))]
    assert session.told[2][0] == "COMPLETE"
    assert [o.state for o in reporter.finished] == ["PRUNED", "COMPLETE", "COMPLETE"]
    assert summary.best_trial in (0, 2) and summary.model_epochs == pytest.approx((4 + 2 + 4) * 100 / 100)


def test_a_diverged_trial_is_pruned_with_its_reason_and_never_reported_to_the_pruner():
    session = FakeSession(target=2, epochs=3)
    loop, _ = make_loop(session, FakeTrainer(diverge={0: 2}))
    loop.execute()
    state, value, record = session.told[0]
    assert state == "PRUNED" and record.stop_reason == "non-finite loss at epoch 2"
    assert record.val_loss == 0.4 and record.curves["val_acc"][-1] is None  # NaN stored as null
    assert (0, 2) not in [(n, e) for n, e, _ in session.reports]


def test_a_collapsed_trial_is_pruned_even_when_the_pruner_would_keep_it():
    curve = {1: 0.9, 2: 0.95, 3: 0.1, 4: 0.1, 5: 0.1}
    session = FakeSession(target=1, epochs=5)
    loop, _ = make_loop(session, FakeTrainer(curve=lambda n, e: curve[e]), population=1)
    loop.execute()
    state, _, record = session.told[0]
    assert state == "PRUNED" and record.stop_reason.startswith("accuracy collapsed to 0.100 at epoch 4")


def test_timeout_cuts_running_trials_short_and_stops_asking():
    clock = Clock()

    class SlowTrainer(FakeTrainer):
        def run_epoch(self):
            clock.now += 10.0  # each epoch takes 10 s
            return super().run_epoch()

    session = FakeSession(target=10, epochs=5)
    session.told[99] = ("COMPLETE", 0.3, None)  # from an earlier run: the study has a model already
    loop, _ = make_loop(session, SlowTrainer(), population=2, timeout=25, clock=clock)
    summary = loop.execute()
    assert summary.stopped_by == "timeout"
    assert sorted(session.told) == [0, 1, 99] and session.next_number == 2  # nothing asked after the timeout
    assert all(session.told[n][0] == "PRUNED" and session.told[n][2].stop_reason == "timeout"
               and session.told[n][2].epochs_run == 3 for n in (0, 1))


def test_a_timeout_without_a_trial_target_runs_until_the_time_is_up():
    clock = Clock()

    class SlowTrainer(FakeTrainer):
        def run_epoch(self):
            clock.now += 1.0
            return super().run_epoch()

    from hpsearch.config import resolve_trials

    settings = RunSettings(trials=resolve_trials(None, 30.0), epochs=1, timeout=30, storage="sqlite:///x.db")
    session = FakeSession(target=settings.trial_target, epochs=1)  # the real session asks up to it too
    loop = SearchLoop(settings, session, SlowTrainer(), Recorder(), population=1, data=DATA, device="cpu:test",
                      clock=clock, sleep=clock.sleep)
    summary = loop.execute()
    assert summary.stopped_by == "timeout" and len(session.told) == 30  # not the default 20


def test_trials_left_out_mean_20_or_no_limit_with_a_timeout():
    from hpsearch.config import resolve_trials

    assert (resolve_trials(None, None), resolve_trials(None, 600.0), resolve_trials(5, 600.0)) == (20, None, 5)
    with pytest.raises(HPSearchError, match="give --trials or --timeout"):
        RunSettings(trials=None).validate()


def test_timeout_lets_trials_finish_while_the_study_has_no_complete_trial():
    """A --timeout shorter than one trial must not end with nothing to report: the trials in
    training finish (each may still be pruned), nothing new is asked, and the run says why."""
    clock = Clock()

    class SlowTrainer(FakeTrainer):
        def run_epoch(self):
            clock.now += 10.0
            return super().run_epoch()

    session = FakeSession(target=10, epochs=5, prune_at={1: 4})
    loop, reporter = make_loop(session, SlowTrainer(), population=2, timeout=25, clock=clock)
    summary = loop.execute()
    assert summary.stopped_by == "timeout" and session.next_number == 2 and summary.best_trial == 0
    assert session.told[0][0] == "COMPLETE" and session.told[0][2].epochs_run == 5
    assert session.told[1][0] == "PRUNED" and session.told[1][2].stop_reason == "pruned"  # the pruner still rules
    assert reporter.notes == ["time is up, but the study has no complete trial yet: trials 0, 1 go on until one completes"]


def test_a_trial_another_worker_took_is_dropped_not_told():
    session = FakeSession(target=2, epochs=2, taken={0})
    trainer = FakeTrainer()
    loop, reporter = make_loop(session, trainer, population=1)
    summary = loop.execute()
    assert 0 not in trainer and sorted(session.told) == [1, 2] and summary.trials_run == 2  # 2 fills its slot
    assert any("trial 0 was declared lost by another worker" in n for n in reporter.notes)


def test_waits_for_trials_running_in_other_workers():
    session = FakeSession(target=2, epochs=1, running_elsewhere=1)
    clock = Clock()
    loop, reporter = make_loop(session, FakeTrainer(), population=1, clock=clock)

    def other_worker_finishes(seconds):
        clock.sleep(seconds)
        session.running_elsewhere = 0
        session.told[99] = ("COMPLETE", 0.3, None)

    loop.sleep = other_worker_finishes
    summary = loop.execute()
    assert summary.stopped_by == "trials" and clock.now > 0
    assert reporter.notes == ["1 of 2 trials finished, 1 running in other workers: waiting for them"]


def test_an_interrupt_fails_and_requeues_the_trials_in_training():
    session = FakeSession(target=4, epochs=3)
    loop, reporter = make_loop(session, FakeTrainer(fail_on_epoch=2, error=Interrupted(15)), population=2)
    with pytest.raises(Interrupted) as caught:
        loop.execute()
    assert session.abandoned == ("interrupted", [0, 1], [0, 1])
    assert caught.value.message == ("interrupted: trials 0, 1 marked failed and queued to run again; "
                                    "0 of 4 trials finished; run the same command again to continue")
    assert reporter.messages == [caught.value.message]


def test_a_failing_storage_requeues_and_becomes_one_line_while_a_bug_does_not_requeue():
    session = FakeSession(target=2, epochs=3)
    loop, _ = make_loop(session, FakeTrainer(fail_on_epoch=1, error=OSError("disk I/O error")))
    with pytest.raises(HPSearchError, match="failed during the run: disk I/O error; finished trials are kept "
                                            "and 2 running ones queued again"):
        loop.execute()
    session = FakeSession(target=2, epochs=3)
    loop, _ = make_loop(session, FakeTrainer(fail_on_epoch=1, error=RuntimeError("a bug")))
    with pytest.raises(RuntimeError):
        loop.execute()
    assert session.abandoned == ("error: a bug", [0, 1], [])


def _result(epoch=2, finished=False, diverged=None, val=0.8):
    return EpochResult(0, epoch, 0.5, 0.8, 0.4, val, 1.0, 1, finished, diverged)


def test_judge():
    never, always = (lambda: False), (lambda: True)
    assert judge(_result(), [0.7, 0.8], 10, never, False) is None
    assert judge(_result(), [0.7, 0.8], 10, always, False) == Verdict("PRUNED", "pruned")
    assert judge(_result(), [0.7, 0.8], 10, never, True) == Verdict("PRUNED", "timeout")
    assert judge(_result(finished=True), [0.7, 0.8], 10, always, True) == Verdict("COMPLETE", None)
    assert judge(_result(diverged="loss exploded"), [0.7], 10, never, False) == Verdict("PRUNED", "loss exploded")
    collapsed = judge(_result(epoch=4, finished=True), [0.9, 0.9, 0.1, 0.1], 10, never, False)
    assert collapsed.state == "PRUNED" and collapsed.reason.startswith("accuracy collapsed")


def test_the_reporter_sees_each_epoch_of_the_trials_training_on_retries_and_the_best_so_far():
    session = FakeSession(target=2, epochs=3)
    session.told[7] = ("COMPLETE", 0.83, None)  # a finished trial from an earlier run
    session.target = 3
    asked = session.ask

    def ask_a_retry():
        trial = asked()
        return trial if trial is None or trial.number != 1 else AskedTrial(1, trial.config, trial.params, retry_of=7)

    session.ask = ask_a_retry
    loop, reporter = make_loop(session, FakeTrainer(), population=2)
    loop.execute()
    assert reporter.started == (1, 0.83)  # a resumed run shows the study's best from the start
    # epochs 1 and 2 of both trials; epoch 3 finishes them, so nothing is training on after it
    assert reporter.epochs == [[(0, 1, 3, 0.51), (1, 1, 3, 0.51)], [(0, 2, 3, 0.52), (1, 2, 3, 0.52)]]
    assert "trial 1 retries trial 7 (same parameters and seed)" in reporter.notes
    assert [o.retry_of for o in reporter.finished] == [None, 7]


def _allocator_failure() -> RuntimeError:
    try:
        torch.empty(1 << 62, dtype=torch.uint8)  # the CPU allocator's own failure
    except RuntimeError as exc:
        return exc
    raise AssertionError("4 EiB were allocated")


def test_trials_that_run_out_of_memory_fail_and_the_study_goes_on():
    session = FakeSession(target=3, epochs=2)
    loop, reporter = make_loop(session, FakeTrainer(fail_on_epoch=1, error=_allocator_failure()), population=2)
    loop.execute()
    assert sorted(session.failed) == [0, 1]
    assert all(reason.startswith("out of memory: ") and "can't allocate memory" in reason
               for reason in session.failed.values())
    assert session.abandoned[2] == []  # not queued again: they would run out again
    assert [n for n, (state, _, _) in session.told.items() if state == "COMPLETE"] == [2, 3, 4]
    assert any("trials 0, 1 failed, not trained further: out of memory" in note for note in reporter.notes)


def test_configs_that_cannot_fit_are_failed_before_training_and_a_space_of_them_ends_the_run():
    too_big = lambda config: "needs about 240.0 GiB of memory to train" if config.seed % 2 else None  # noqa: E731
    session = FakeSession(target=3, epochs=2)
    trainer = FakeTrainer()
    loop, _ = make_loop(session, trainer, population=1, memory_refusal=too_big)
    loop.execute()
    assert sorted(session.failed) == [1, 3] and len(session.told) == 3
    assert all(reason.startswith("needs about") for reason in session.failed.values())

    session = FakeSession(target=3, epochs=2)
    loop, _ = make_loop(session, FakeTrainer(), memory_refusal=lambda config: "needs about 240.0 GiB")
    with pytest.raises(HPSearchError, match="20 trials in a row did not fit in memory"):
        loop.execute()
    assert len(session.failed) == 20 and not session.told


def test_the_model_of_each_new_best_trial_is_kept_and_a_failed_write_is_only_a_note(monkeypatch):
    """A report, export or predict then needs no retraining; a full disk, or any other failure to
    keep a model, must not stop the study."""
    values = {0: 0.52, 1: 0.60, 2: 0.55, 3: 0.60}  # 0 and 1 finish together (0 first), each then the best;
    session = FakeSession(target=4, epochs=2)  # 2 is not, nor 3, which only ties 1
    loop, reporter = make_loop(session, FakeTrainer(curve=lambda number, epoch: values[number]))
    loop.execute()
    assert sorted(session.stored) == [0, 1] and len(session.told) == 4
    meta = session.stored[1]
    config = session.told[1][2].config
    assert meta["trained_by"] == "search" and meta["trial"] == 1 and meta["config"] == config
    assert meta["validation_accuracy"] == 0.60 and [h["epoch"] for h in meta["history"]] == [1, 2]
    assert meta["history"][-1]["val_acc"] == 0.60 and meta["history"][-1]["seconds"] == 1.0

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hpsearch.search.save_checkpoint", full_disk)
    session = FakeSession(target=4, epochs=2)
    loop, reporter = make_loop(session, FakeTrainer(curve=lambda number, epoch: values[number]))
    loop.execute()
    assert len(session.told) == 4 and not session.stored
    assert "trial 1's model was not kept: No space left on device; a report retrains it" in reporter.notes

    class NoModels(FakeTrainer):  # e.g. a bug taking the weights out of a population
        def model(self, key):
            raise RuntimeError(f"member {key} has no weights")

    monkeypatch.undo()
    session = FakeSession(target=4, epochs=2)
    loop, reporter = make_loop(session, NoModels(curve=lambda number, epoch: values[number]))
    loop.execute()
    assert len(session.told) == 4 and not session.stored
    assert "trial 0's model was not kept: member 0 has no weights; a report retrains it" in reporter.notes

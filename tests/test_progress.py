"""The run's progress bar: a --timeout-only run shows its time, since it has no trial target."""

from __future__ import annotations

import io
from types import SimpleNamespace

import torch
from rich.console import Console

from hpsearch import progress
from hpsearch.config import RunSettings

DATA = SimpleNamespace(name="fake", train_y=torch.zeros(9), val_y=torch.zeros(1), source="memory",
                       train_x=torch.zeros(1))


def started(settings, monkeypatch, clock):
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    reporter = progress.RichReporter(Console(file=io.StringIO(), width=120))
    reporter.start(settings, DATA, already=0, population=1)
    return reporter


def task(reporter, task_id):
    return next(t for t in reporter.progress.tasks if t.id == task_id)


def test_a_timeout_only_run_shows_its_seconds_of_search(monkeypatch):
    clock = [1000.0]
    reporter = started(RunSettings(trials=None, timeout=60, storage="sqlite:///x.db"), monkeypatch, clock)
    try:
        clock[0] += 30
        reporter.epochs_done([SimpleNamespace(number=0, epoch=1, epochs=20, val_acc=0.8)])
        seconds = task(reporter, reporter.time_task)
        assert (seconds.description, seconds.total, seconds.completed) == ("seconds", 60, 30)
        clock[0] += 45  # past the timeout (a trial may still be completing): the bar stops at full
        reporter.epochs_done([SimpleNamespace(number=0, epoch=2, epochs=20, val_acc=0.8)])
        assert seconds.completed == 60
    finally:
        reporter.interrupted("")


def test_a_trial_target_is_the_bar_and_no_time_bar_is_added(monkeypatch):
    reporter = started(RunSettings(trials=20, timeout=60, storage="sqlite:///x.db"), monkeypatch, [0.0])
    try:
        assert reporter.time_task is None
        assert task(reporter, reporter.task).total == 20
    finally:
        reporter.interrupted("")


def test_a_trial_line_shows_the_network_with_its_fixed_settings(monkeypatch):
    from hpsearch.search import TrialOutcome

    reporter = started(RunSettings(trials=2, storage="sqlite:///x.db"), monkeypatch, [0.0])
    try:
        reporter.trial_finished(TrialOutcome(0, "COMPLETE", 0.91, 20, 4.7, {"lr": 5e-4, "batch_size": 128},
                                             shape="3x920 bn relu"), 0.91, 1)
        printed = reporter.progress.console.file.getvalue()
        assert "3x920 bn relu" in printed and "lr=0.0005" in printed
    finally:
        reporter.interrupted("")

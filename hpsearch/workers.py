"""`hpsearch run --workers N`: N processes of the search loop on one study.

The parent checks everything first (settings, space, storage, study identity, dataset), so bad
input gives one error line, not one per worker; then it starts the workers, each in its own
session (a terminal Ctrl-C reaches only the parent, which forwards it once), relays their stderr
without repeats, forwards SIGINT/SIGTERM, and reports the study when all have exited. Each child
is `hpsearch worker SETTINGS_JSON` with its own device: the settings travel as one serialized
value, never rebuilt flag by flag. Workers watch the parent and stop cleanly if it disappears.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
from typing import Callable

from .config import RunSettings, worker_devices
from .data import load_dataset
from .errors import HPSearchError, Interrupted
from .study import StudySession, continue_settings, error_line, read_outcome, storage_file

Echo = Callable[[str], None]


def worker_argv(settings: RunSettings, device: str, debug: bool) -> list[str]:
    """The command line of one worker child: its settings, with its own device, as JSON."""
    mine = dataclasses.replace(settings, device=device)
    return [sys.executable, "-m", "hpsearch", *(["--debug"] if debug else []), "worker", mine.to_json()]


def _check_before_starting(settings: RunSettings) -> None:
    settings.validate()
    if storage_file(settings.storage) is None and settings.storage.startswith("sqlite"):
        raise HPSearchError("--workers needs a storage every process can open: an in-memory SQLite "
                            "database is private to one process; use a file (sqlite:///studies/x.db)")
    settings, space = continue_settings(settings)  # each worker resolves the same again in run_study
    # The data before the study (as run_study does): a bad --subset must not leave a study behind.
    load_dataset(settings.dataset, settings.data_dir, "cpu", settings.val_fraction, settings.subset,
                 settings.seed)  # fails here, once, on bad data; downloads once if needed
    StudySession(settings, space)  # creates the study, or checks its identity


class _Relay:
    """Copies the workers' stderr lines to the user, each distinct line once."""

    def __init__(self, echo_err: Echo):
        self.echo_err = echo_err
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def follow(self, stream) -> None:
        thread = threading.Thread(target=self._copy, args=(stream,), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _copy(self, stream) -> None:
        for line in stream:
            line = line.rstrip("\n")
            with self.lock:
                # the parent sums up interruptions itself; identical lines from several workers once
                if not line.strip() or line in self.seen or line.startswith("interrupted"):
                    continue
                self.seen.add(line)
            self.echo_err(line)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=5)


def _start(settings: RunSettings, devices: list[str], debug: bool, relay: _Relay) -> list[subprocess.Popen]:
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    procs = []
    for i, device in enumerate(devices):
        env = {**os.environ, "HPSEARCH_WORKER": str(i), "HPSEARCH_WORKERS": str(len(devices)),
               "HPSEARCH_PARENT_PID": str(os.getpid())}
        if device == "cpu":
            env.setdefault("OMP_NUM_THREADS", str(threads))
        proc = subprocess.Popen(worker_argv(settings, device, debug), env=env, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        procs.append(proc)
        relay.follow(proc.stderr)
    return procs


def _wait(procs: list[subprocess.Popen]) -> int | None:
    """Wait for every worker; forward SIGINT/SIGTERM to them. Returns the signal, if one came."""
    signum = None
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
    return signum


def run_workers(settings: RunSettings, workers: int, *, debug: bool = False, echo: Echo = print,
                echo_err: Echo | None = None) -> int:
    """Run `workers` processes of the search loop on one study; returns the exit code."""
    echo_err = echo_err or (lambda line: print(line, file=sys.stderr, flush=True))
    _check_before_starting(settings)
    devices = worker_devices(settings.device, workers)
    goal = (f"{settings.timeout:g} s of search in each of {workers} workers" if settings.trials is None
            else f"{settings.trials} finished trials shared by {workers} workers")
    echo(f"study {settings.study}: {goal} "
         f"({', '.join(devices)})")
    relay = _Relay(echo_err)
    procs: list[subprocess.Popen] = []
    signum = None
    try:
        procs = _start(settings, devices, debug, relay)
        signum = _wait(procs)
    finally:
        for p in procs:  # only if the parent itself is failing: do not leave workers behind
            if p.poll() is None and signum is None:
                p.terminate()
        relay.join()
    return _conclude(settings, [p.returncode for p in procs], signum, echo, echo_err)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code if code < 0 else code - 128).name
    except ValueError:
        return f"exit {code}"


def _conclude(settings: RunSettings, codes: list[int | None], signum: int | None, echo: Echo,
              echo_err: Echo) -> int:
    """Say what the study holds now, and turn the workers' exit codes into the parent's."""
    try:
        counts, best = read_outcome(settings.storage, settings.study)
    except Exception as exc:  # noqa: BLE001
        echo_err(f"error: cannot read the study after the run: {error_line(exc)}")
        return 1
    best_text = f"best {best.value:.4f} (trial {best.number})" if best else "no complete trial yet"
    finished = f"{settings.finished_text(counts.finished)} trials finished"
    echo(f"study {settings.study}: {finished} ({counts.complete} complete, {counts.pruned} pruned, "
         f"{counts.failed} failed, {counts.running} running, {counts.waiting} queued); {best_text}")
    if signum is not None:
        if counts.finished >= settings.trial_target:  # the signal came as the last trials finished
            echo_err(f"interrupted after the study was complete ({finished}): nothing is left to continue")
        else:
            echo_err(f"interrupted: workers stopped, their running trials marked failed and queued to run again; "
                     f"{finished}; run the same command again to continue")
        return 128 + signum
    killed = [f"worker {i} ({_signal_name(c)})" for i, c in enumerate(codes)
              if c is not None and (c < 0 or c in (128 + signal.SIGINT, 128 + signal.SIGTERM))]
    if counts.finished >= settings.trial_target:
        if killed:
            echo_err(f"note: {', '.join(killed)} died; the others finished the study (its trials were retried)")
        return 0
    if all(c == 0 for c in codes):  # --timeout
        return 0
    if killed:
        echo_err(f"error: {', '.join(killed)} died; {finished}; run the same command again to continue")
    return next((c for c in codes if c and c > 0), 1)

"""How a run shows itself: a rich progress bar in a terminal or a notebook (`RichReporter`), plain
prefixed lines for `--workers` children (`WorkerReporter`). Both implement search.Reporter."""

from __future__ import annotations

import json
import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .specs import describe_shape


def _best_text(best: float | None) -> str:
    return f"best {best:.4f}" if best is not None else "best -"


class RichReporter:
    """Progress bar (trials done, best so far, ETA) and one concise line per finished trial."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(highlight=False)
        self.progress: Progress | None = None
        self.task = None
        self.time_task = None  # a --timeout-only run's bar of seconds
        self._started, self._timeout = time.monotonic(), 0

    def start(self, settings, data, already, population, best=None):
        from .study import redact

        self.console.print(
            f"[bold]study[/] {settings.study}  [bold]storage[/] {redact(settings.storage)}  "
            f"[bold]data[/] {data.name} ({len(data.train_y)} train / {len(data.val_y)} val, {data.source})  "
            f"[bold]device[/] {data.train_x.device}  [bold]population[/] {population}")
        if already >= settings.trial_target:
            self.console.print(f"study {settings.study} already holds {already} finished trials (--trials "
                               f"{settings.trials}): nothing to do; to run more, raise the target, e.g. --trials "
                               f"{already + settings.trials}", soft_wrap=True)
        elif already:
            self.console.print(f"continuing: {settings.finished_text(already)} trials already finished"
                               + (f", best {best:.4f}" if best is not None else ""))
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("trials", total=settings.trials,  # no target (--timeout alone): no total
                                           completed=min(already, settings.trial_target),
                                           info=_best_text(best))
        if settings.trials is None:  # --timeout alone bounds the run: its bar is the time
            self._started, self._timeout = time.monotonic(), math.ceil(settings.timeout)
            self.time_task = self.progress.add_task("seconds", total=self._timeout, info="of search")
        # The epochs of the trials in training: a long trial shows it is moving.
        self.epoch_task = self.progress.add_task("epochs", total=settings.epochs, visible=False, info="")
        self._training: tuple[int, ...] = ()

    def _tick(self) -> None:
        if self.time_task is not None:
            # past the timeout the last trials may still be completing: the bar stays full
            elapsed = math.floor(time.monotonic() - self._started)
            self.progress.update(self.time_task, completed=min(self._timeout, elapsed))

    def epochs_done(self, running):
        self._tick()
        numbers = tuple(sorted(r.number for r in running))
        if numbers != self._training:  # other trials now: their own elapsed time and eta
            self.progress.reset(self.epoch_task)
            self._training = numbers
        lead = max(running, key=lambda r: r.epoch)
        label = f"trial {numbers[0]}" if len(numbers) == 1 else f"{len(numbers)} trials"
        self.progress.update(self.epoch_task, description=label, total=lead.epochs, completed=lead.epoch,
                             visible=True, info=f"val {max(r.val_acc for r in running):.4f}")

    def trial_finished(self, outcome, best, done):
        p = outcome.params
        shape = outcome.shape or describe_shape(p)
        opt = (f"{p['optimizer']} " if "optimizer" in p else "") + \
            f"lr={p.get('lr', 0):.2g} wd={p.get('weight_decay', 0):.1g} bs={p.get('batch_size', '')}"
        state = "[green]complete[/]" if outcome.state == "COMPLETE" else f"[yellow]{outcome.reason or 'pruned'}[/]"
        retry = f" (retry of {outcome.retry_of})" if outcome.retry_of is not None else ""
        self.progress.console.print(soft_wrap=True, *[
            f"trial {outcome.number:>4}{retry} {state:<22} val_acc {outcome.value:.4f}  epochs {outcome.epochs:>3}  "
            f"{outcome.seconds_per_epoch:6.2f}s/epoch  {shape}  {opt}"])
        self.progress.update(self.task, completed=done, info=_best_text(best))
        self._tick()

    def note(self, message):
        (self.progress.console if self.progress is not None else self.console).print(message, markup=False, soft_wrap=True)

    def interrupted(self, message):
        if self.progress is not None:
            self.progress.stop()  # restores the cursor; main() prints the message on stderr

    def finish(self, summary):
        if self.progress is not None:
            self._tick()  # the time bar moves on events only: bring it up to date
            self.progress.stop()
        best = f"{summary.best_value:.4f} (trial {summary.best_trial})" if summary.best_value is not None else "-"
        self.console.print(
            f"[bold]done[/]: {summary.trials_run} trials in {summary.wall_seconds:.1f}s "
            f"({summary.finished_in_study} finished in study; stopped by {summary.stopped_by}); best {best}; "
            f"population K={summary.population} on {summary.device}; "
            f"{summary.model_epochs_per_second:.2f} model-epochs/s")
        shares = ", ".join(f"{k} {v:.0%}" for k, v in summary.time_shares.items())
        self.console.print(f"wall time: {shares}, other {max(0.0, 1 - sum(summary.time_shares.values())):.0%}")
        if summary.best_params:
            self.console.print("best params: " + json.dumps(summary.best_params))


class WorkerReporter:
    """One plain line per event, prefixed with the worker's index: for `--workers` children, which
    share the terminal with each other (no progress bars)."""

    EPOCH_LINE_SECONDS = 30.0

    def __init__(self, index: str):
        self.prefix = f"[w{index}]"
        self.target = "?"
        self._last_epoch_line = time.monotonic()

    def _print(self, text: str) -> None:
        print(f"{self.prefix} {text}", flush=True)

    def start(self, settings, data, already, population, best=None):
        self.target = settings.trials if settings.trials is not None else "-"
        self._print(f"started: {data.name} {len(data.train_y)} train / {len(data.val_y)} val on "
                    f"{data.train_x.device}, population {population}; {settings.finished_text(already)} finished"
                    + (f", best {best:.4f}" if best is not None else ""))

    def epochs_done(self, running):
        now = time.monotonic()
        if now - self._last_epoch_line < self.EPOCH_LINE_SECONDS:
            return  # several workers share a terminal: a line per trial epoch would drown it
        self._last_epoch_line = now
        self._print("training: " + ", ".join(f"trial {r.number} epoch {r.epoch}/{r.epochs} val {r.val_acc:.4f}"
                                             for r in sorted(running, key=lambda r: r.number)))

    def trial_finished(self, outcome, best, done):
        state = "complete" if outcome.state == "COMPLETE" else (outcome.reason or "pruned")
        if outcome.retry_of is not None:
            state += f" (retry of {outcome.retry_of})"
        best_text = f"{best:.4f}" if best is not None else "-"
        self._print(f"trial {outcome.number:>4} {state:<10} val_acc {outcome.value:.4f}  epochs {outcome.epochs:>3}  "
                    f"study {done}/{self.target} best {best_text}")

    def note(self, message):
        self._print(message)

    def interrupted(self, message):
        pass

    def finish(self, summary):
        self._print(f"done: {summary.trials_run} trials in {summary.wall_seconds:.1f}s "
                    f"({summary.finished_in_study} finished in study; stopped by {summary.stopped_by})")

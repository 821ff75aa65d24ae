"""The `hpsearch` command: parse, validate, call the library, print with rich.

User errors (`HPSearchError`) become one line on stderr and exit code 2; `--debug` shows the
traceback instead. Every command is a thin wrapper over a library function.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import DEFAULT_STORAGE, DEFAULT_STUDY
from .errors import HPSearchError, Interrupted, first_line

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Hyperparameter search for MNIST-style image classifiers (Optuna + PyTorch).",
)
console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)
_DEBUG = {"on": False}

def _flags_without_metavar() -> None:
    """`--json  <bool>` in typer's help says a value is expected: flags take none, so show no type."""
    try:
        from typer.core import TyperOption
    except ImportError:  # another typer layout: its default help
        return
    shown = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_flags_without_metavar()

STORAGE_HELP = "Optuna storage URL (sqlite:///path.db, postgresql://..., journal:path.log)."


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"hpsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
          version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print hpsearch's version and exit.")) -> None:
    _DEBUG["on"] = debug
    from .config import set_cli_debug

    set_cli_debug(debug)  # hpsearch.study configures Optuna's logging from it when first imported
    if "hpsearch.study" in sys.modules:  # already imported (in-process callers): configure it now
        from .study.logs import configure_optuna_logging

        configure_optuna_logging(debug)
    if not debug:
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _watch_parent(parent_pid: int) -> None:
    """In a `--workers` child: stop cleanly (as on SIGTERM) if the parent process disappears."""
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="hpsearch-parent-watch", daemon=True).start()


@app.command()
def run(
    ctx: typer.Context,
    trials: Optional[int] = typer.Option(None, "--trials", "-n", show_default=False,
                                         help="Finished trials the study should hold (re-running continues up to this). "
                                              "Default: 20, or no limit with --timeout."),
    timeout: Optional[float] = typer.Option(None, help="Stop asking for trials after this many seconds; running ones are cut short once the study has a complete trial."),
    study: str = typer.Option(DEFAULT_STUDY, help="Study name."),
    storage: str = typer.Option(DEFAULT_STORAGE, help=STORAGE_HELP),
    dataset: str = typer.Option("fashion-mnist", help="mnist, fashion-mnist, kmnist or idx (a directory of IDX files)."),
    data_dir: Optional[str] = typer.Option(None, help="Directory with the four IDX files (raw or .gz), or where to download."),
    space: Optional[str] = typer.Option(None, help="Search-space TOML, or a shipped space by name: mlp (the default), mlp-wide or cnn (studies/NAME.toml if present, else the packaged one)."),
    epochs: int = typer.Option(20, help="Epoch budget per trial; pruning decides how many a trial gets."),
    subset: Optional[int] = typer.Option(None, help="Use N training images (stratified) for quick CPU runs."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    seed: int = typer.Option(0, help="Seed for the split, the sampler and every trial."),
    pruner: str = typer.Option("median", help="median, median-margin (stops a trial only when it is behind by more "
                                             "than 2 standard errors of validation noise), halving (asynchronous "
                                             "successive halving), hyperband or none."),
    sampler: str = typer.Option("auto", help="auto (= tpe), tpe, random or gp (Gaussian process; needs scipy)."),
    population: str = typer.Option("auto", help="Trials trained at once as one batched computation (K or auto: 1 on CPU, 32 on GPU)."),
    val_fraction: float = typer.Option(0.1, help="Share of the training file held out for validation."),
    precision: str = typer.Option("fp32", help="Matmul precision on a GPU: fp32, tf32 or bf16 (autocast; weights stay fp32)."),
    grouping: str = typer.Option("auto", help="Which population members train as one computation: batch (pad shapes), width (pad within 2x), shape (exact), or auto (shape on CPU, batch on GPU)."),
    start: bool = typer.Option(True, "--start/--no-start", help="A new study first runs the space's \\[\\[start]] "
                                                                 "configurations (known-good settings), then samples."),
    workers: str = typer.Option("auto", help="Worker processes sharing the study (N, or auto: one per GPU when "
                                             "there are several, else 1). --trials counts for all of them together."),
) -> None:
    """Search: sample, train and prune trials into an Optuna study (resumable; safe to run in parallel)."""
    from .config import RunSettings, resolve_trials, resolve_workers
    from .search import run_study
    from .workers import run_workers

    settings = RunSettings(trials=resolve_trials(trials, timeout), timeout=timeout, study=study, storage=storage,
                           dataset=dataset, data_dir=data_dir, space=space, epochs=epochs, subset=subset, device=device,
                           seed=seed, pruner=pruner, sampler=sampler, population=population, val_fraction=val_fraction,
                           precision=precision, grouping=grouping, start=start, given=_given(ctx, IDENTITY_FLAGS))
    n = resolve_workers(workers, device)
    if n == 1:
        from .progress import RichReporter

        run_study(settings, RichReporter(console))
        return
    code = run_workers(settings, n, debug=_DEBUG["on"], echo=lambda line: console.print(line, markup=False, soft_wrap=True),
                       echo_err=lambda line: err_console.print(line, markup=False, soft_wrap=True))
    if code:
        raise typer.Exit(code)


# What a study measures; left out on the command line, they come from an existing study.
IDENTITY_FLAGS = ("dataset", "subset", "val_fraction", "epochs", "seed", "space")


def _given(ctx: typer.Context, names: tuple[str, ...]) -> tuple[str, ...]:
    """The options of `names` set on the command line (or through the environment), not defaulted.

    By the source's name: click's ParameterSource lives in click or in typer's vendored copy."""
    sources = {n: ctx.get_parameter_source(n) for n in names}
    return tuple(n for n, source in sources.items() if source is not None and source.name != "DEFAULT")


@app.command(hidden=True)
def worker(settings_json: str = typer.Argument(..., help="RunSettings as JSON (see hpsearch.workers).")) -> None:
    """One worker of `hpsearch run --workers N` (started by the parent, not by hand)."""
    from .config import RunSettings
    from .search import run_study

    parent = os.environ.get("HPSEARCH_PARENT_PID")
    if parent:
        _watch_parent(int(parent))
    from .progress import WorkerReporter

    run_study(RunSettings.from_json(settings_json), WorkerReporter(os.environ.get("HPSEARCH_WORKER", "?")))


@app.command()
def studies(
    storage: str = typer.Option(DEFAULT_STORAGE, help=STORAGE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the studies in a storage with trial counts and best values."""
    from .study import list_studies

    rows = list_studies(storage)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print(f"no studies in {storage}")
        return
    table = Table(title=storage)
    for col in ("study", "dataset", "trials", "complete", "pruned", "failed", "running", "best", "started"):
        table.add_column(col, justify="right" if col not in ("study", "dataset", "started") else "left")
    for r in rows:
        table.add_row(*[f"{r[c]:.4f}" if c == "best" and r[c] is not None else str(r[c] if r[c] is not None else "-")
                        for c in ("study", "dataset", "trials", "complete", "pruned", "failed", "running", "best", "started")])
    console.print(table)


@app.command()
def report(
    study: Optional[str] = typer.Option(None, help="Study name (default: the storage's only study, else 'hpsearch')."),
    storage: str = typer.Option(DEFAULT_STORAGE, help=STORAGE_HELP),
    out: Optional[str] = typer.Option(None, help="Output folder (default results/<study>/)."),
    retrain: Optional[bool] = typer.Option(
        None, "--retrain/--no-retrain", show_default=False,
        help="--retrain: retrain the best trial (training split) and test it even if the folder's best_model.pt "
             "or the model the search kept is its model; --no-retrain: neither retrain nor test. "
             "Default: retrain only when needed."),
    importance: str = typer.Option("ped-anova", help="Importance evaluator: ped-anova (Optuna's default) or fanova (needs scikit-learn)."),
    device: str = typer.Option("auto", help="Device for retraining: auto, cpu or cuda[:N]."),
    data_dir: Optional[str] = typer.Option(None, help="Where the study's dataset is, if not where the study says."),
    artifact: bool = typer.Option(True, "--artifact/--no-artifact",
                                  help="Also store the checkpoint as an Optuna artifact of the study (for optuna-dashboard)."),
) -> None:
    """Report a study: charts, trials.csv, and the best model (kept by the search, else retrained) tested and saved."""
    from .report import write_report

    index = write_report(study, storage, out, retrain=retrain, importance=importance, device=device,
                         data_dir=data_dir, artifact=artifact, log=lambda msg: console.print(msg, soft_wrap=True, markup=False))
    line = f"[bold]report[/]: {index}"
    best_json = index.parent / "best.json"
    if retrain is not False and best_json.is_file():
        best = json.loads(best_json.read_text())
        line += (f"  best trial {best['trial']}: validation {best['validation_accuracy']:.4f}, "
                 f"test {best['test_accuracy']:.4f}; model {index.parent / 'best_model.pt'}")
    console.print(line, soft_wrap=True)
    _print_start_comparison(index.parent / "summary.json")


def _print_start_comparison(summary_json: Path) -> None:
    """The best start beside the best trial, with a caveat when the validation lead may be luck."""
    from .study import start_comparison

    line = start_comparison(json.loads(summary_json.read_text())) if summary_json.is_file() else None
    if line:
        console.print(line, soft_wrap=True, markup=False)


@app.command()
def dashboard(
    storage: str = typer.Option(DEFAULT_STORAGE, help=STORAGE_HELP),
    port: int = typer.Option(8080, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only)."),
    artifact_dir: Optional[str] = typer.Option(None, help="Artifact store folder (default: artifacts/ beside the database)."),
) -> None:
    """Start optuna-dashboard on the study storage (with the study's checkpoints as artifacts)."""
    from .dashboard import serve_dashboard

    serve_dashboard(storage, host, port, artifact_dir, announce=lambda msg: console.print(msg, markup=False),
                    warn=lambda msg: err_console.print(msg, markup=False, soft_wrap=True))


@app.command()
def export(
    checkpoint: Optional[str] = typer.Option(None, help="An hpsearch checkpoint (default: the best trial's, kept by `hpsearch run` or made by `hpsearch report`)."),
    fmt: str = typer.Option("onnx", "--format", help="pt (a checked copy of the checkpoint), torchscript or onnx."),
    out: Optional[str] = typer.Option(None, help="File to write (default: results/<study>/best_model.onnx, .ts for "
                                                 "torchscript, best_model.export.pt for pt; with --checkpoint, beside it)."),
    study: Optional[str] = typer.Option(None, help="Take the checkpoint of this study's best trial (default: the storage's only study)."),
    storage: str = typer.Option(DEFAULT_STORAGE, help=STORAGE_HELP),
) -> None:
    """Export a checkpoint as TorchScript or ONNX: float images [N, 1, 28, 28] in [0, 1] -> logits."""
    from .api import export_plan
    from .export import export_model

    plan = export_plan(checkpoint, fmt, out, study, storage)  # the same defaults as hpsearch.export()
    path = export_model(plan.checkpoint, fmt, plan.out)
    console.print(f"wrote {path} ({fmt}, from {plan.checkpoint})", soft_wrap=True, markup=False)


@app.command()
def predict(
    images: list[str] = typer.Argument(..., help="Image files (PNG, JPEG, ...; any size or mode)."),
    checkpoint: Optional[str] = typer.Option(None, help="An hpsearch checkpoint (best_model.pt), or its TorchScript or ONNX export."),
    study: Optional[str] = typer.Option(None, help="Use the checkpoint of this study's best trial (default: the storage's only study)."),
    storage: str = typer.Option(DEFAULT_STORAGE, help=STORAGE_HELP),
    invert: Optional[bool] = typer.Option(None, "--invert/--no-invert", show_default=False,
                                          help="Invert images first (dark ink on a light background), or never. "
                                               "Default: images whose border is mostly light are inverted."),
    resize: str = typer.Option("auto", help="Images not 28x28: mnist (fit 20x20, centre of mass), fit (longer side 28) or auto (by dataset)."),
    top: Optional[int] = typer.Option(None, min=1, help="Classes listed per image (default: 3 with --json, 1 in text)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Predict the class of image files with a checkpoint (exit 1 if some files could not be read)."""
    from .api import checkpoint_for
    from .export import predict_images

    k = top if top is not None else (3 if as_json else 1)
    results = predict_images(images, checkpoint_for(checkpoint, study, storage)[0], invert=invert, resize=resize,
                             top=k, errors="report")

    def report_problem(r) -> None:  # one line per file, naming it; the error messages already do
        if r.error is not None:
            err_console.print(f"[red]error:[/] {escape(r.error)}", soft_wrap=True, highlight=False)
        elif r.warning is not None:
            err_console.print(f"[yellow]warning:[/] {escape(f'{r.image}: {r.warning}')}", soft_wrap=True, highlight=False)

    for r in results:
        if not as_json and r.error is None:
            print(r.text_line(k, mark_inverted=invert is None), flush=True)
        report_problem(r)
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    if any(r.error is not None for r in results):
        raise typer.Exit(1)


@app.command()
def bench(
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]."),
    dataset: str = typer.Option("fashion-mnist", help="Dataset to time on."),
    data_dir: Optional[str] = typer.Option(None, help="Directory with the IDX files."),
    quick: bool = typer.Option(False, help="Shorter measurements (for smoke tests)."),
    models: str = typer.Option("3x128,4x512,cnn", help="Comma-separated bench models: 3x128, 4x512 (MLPs), cnn (a small CNN, 32 -> 64 channels)."),
    population: str = typer.Option("", help="Comma-separated population sizes K to time (default: 4 on CPU, 8,32,128 on GPU)."),
    subset: Optional[int] = typer.Option(None, help="Time on N training images instead of the whole split."),
    mixed: Optional[int] = typer.Option(None, help="Also time N mixed-shape models under each grouping policy (default: 32 on GPU, off on CPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Measure training throughput: hpsearch's trainer against a hand-written loop (row "seeds": DataLoader,
    ToTensor, batch 32)."""
    from .bench import print_bench, run_bench

    try:
        pops = tuple(int(k) for k in population.split(",") if k.strip()) or None
    except ValueError:
        raise HPSearchError(f"--population must be comma-separated integers, got {population!r}") from None
    if pops and min(pops) < 1:
        raise HPSearchError("--population sizes must be at least 1")
    results = run_bench(device=device, dataset=dataset, data_dir=data_dir, quick=quick, populations=pops,
                        models=tuple(m.strip() for m in models.split(",") if m.strip()), subset=subset,
                        mixed=mixed)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print_bench(results, Console(width=max(console.width, 130), highlight=False))


@app.command()
def doctor(
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]: where the self-check and the throughput run."),
    data_dir: Optional[str] = typer.Option(None, help="Fashion-MNIST IDX files for the throughput run (default: where "
                                                      "`run` looks; synthetic images if none; never downloads)."),
    seconds: float = typer.Option(3.0, help="How long to time training throughput."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Describe this machine for a bug report: devices, versions, the CUDA-graph self-check, throughput."""
    from .doctor import format_report, run_doctor

    report = run_doctor(device=device, data_dir=data_dir, seconds=seconds)
    print(json.dumps(report, indent=2) if as_json else format_report(report), flush=True)


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


class _InterruptTracebacks(logging.Filter):
    """Drops log records whose exception is our own Ctrl-C/SIGTERM. The handler above raises
    wherever the signal lands; when that is SQLAlchemy closing a garbage-collected connection,
    SQLAlchemy logs "Exception during reset or similar" with a traceback before passing the
    interrupt on (a fresh-clone CI run: 12 lines instead of the one "interrupted:" line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return _DEBUG["on"] or not isinstance(exc, (Interrupted, KeyboardInterrupt))


def _resend_swallowed_interrupts(unraisable) -> None:
    """sys.unraisablehook: an interrupt raised in a finalizer (__del__, a weakref callback, as
    SQLAlchemy's connection cleanup is) cannot propagate, and Python would print "Exception
    ignored" and carry on as if never interrupted: send the signal again instead."""
    exc = unraisable.exc_value
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        import threading
        import time

        def resend(signum: int) -> None:
            time.sleep(0.05)  # after this hook returns: here the handler's raise would be swallowed again
            os.kill(os.getpid(), signum)

        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        threading.Thread(target=resend, args=(signum,), name="hpsearch-resend", daemon=True).start()
    else:
        sys.__unraisablehook__(unraisable)


def _guard_interrupts_in_libraries() -> None:
    # lastResort prints libraries' warnings when nobody configured logging, as in the CLI
    if logging.lastResort is not None and not any(isinstance(f, _InterruptTracebacks)
                                                  for f in logging.lastResort.filters):
        logging.lastResort.addFilter(_InterruptTracebacks())
    sys.unraisablehook = _resend_swallowed_interrupts


def _usage_error_line(exc) -> None:
    """Click usage errors (unknown flag, `--trials abc`) as one line, with where to get help."""
    ctx = getattr(exc, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    err_console.print(f"[red]error:[/] {escape(exc.format_message())}{escape(hint)}", soft_wrap=True, highlight=False)


def main() -> None:
    """Exit codes: 0 done, 2 bad input or environment (HPSearchError), 1 an I/O failure or an
    unexpected error, 130/143 interrupted by SIGINT/SIGTERM. Always one line on stderr, never a
    traceback unless --debug."""
    # SIGINT and SIGTERM raise Interrupted (a BaseException that click does not turn into
    # "Aborted!"): `run` marks its running trials failed and queued again, then we exit 128+signal.
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    _guard_interrupts_in_libraries()
    try:
        from typer import rich_utils

        rich_utils.rich_format_error = _usage_error_line  # one line, not a box, for bad flags too
    except ImportError:
        pass
    try:
        app(standalone_mode=True)
    except (Interrupted, KeyboardInterrupt) as exc:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # printing the message is not interruptible
        message = getattr(exc, "message", None) or "interrupted; run the same command again to continue"
        err_console.print(message, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code if isinstance(exc, Interrupted) else 130)
    except HPSearchError as exc:
        if _DEBUG["on"]:
            raise
        err_console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except OSError as exc:  # a full disk, a read-only folder, a vanished file: not a bug in hpsearch
        if _DEBUG["on"]:
            raise
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        err_console.print(f"[red]error:[/] {escape(str(exc.strerror or exc) + where)}", soft_wrap=True, highlight=False)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the traceback with --debug
        if _DEBUG["on"]:
            raise
        text = first_line(exc, 300) if str(exc).strip() else ""
        err_console.print(f"[red]error:[/] unexpected {type(exc).__name__}{escape(': ' + text) if text else ''} "
                          f"(rerun with --debug for the traceback)", soft_wrap=True, highlight=False)
        sys.exit(1)

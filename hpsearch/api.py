"""The Python API: the commands as functions, for notebooks and scripts (see docs/api.md).

    hpsearch.run(...)      `hpsearch run`: a study, shown with a progress bar; returns the optuna.Study
    hpsearch.report(...)   `hpsearch report`: the results folder; returns a `Report` (paths, accuracies)
    hpsearch.export(...)   `hpsearch export`: TorchScript, ONNX or a checked copy; returns the file written
    hpsearch.predict(...)  `hpsearch predict`: a `Prediction` per image file
    hpsearch.load_study(...)  a study of an hpsearch storage, as an optuna.Study

The keyword arguments are the commands' flags (`--data-dir` is `data_dir`), with the same
defaults. Mistakes raise `HPSearchError` (or its subclasses `DataError`, `SpaceError`) with a
one-line message; nothing here exits the interpreter. `export_plan` and `checkpoint_for` are the
defaults `hpsearch export` and `hpsearch.export` share: which checkpoint, which output file.

This module imports neither torch nor optuna when it is imported; the functions do, when called.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .config import (DEFAULT_STORAGE, DEFAULT_STUDY, RunSettings, check_study_name, resolve_trials, resolve_workers,
                     results_name)
from .errors import HPSearchError

RESULTS_DIR = "results"
# What a study measures. Left out of `run(...)`, they come from the existing study, as on the CLI.
IDENTITY_OPTIONS = ("dataset", "subset", "val_fraction", "epochs", "seed", "space")
# File endings of the default export next to best_model.pt; pt is a copy, so it must never be
# named best_model.pt itself (it would replace the report's checkpoint).
EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts", "pt": ".export.pt"}


class _Unset:
    """A default the caller left out. Shows as its value in `help(run)`."""

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def run(*, trials: int | None = None, timeout: float | None = None, study: str = DEFAULT_STUDY,
        storage: str = DEFAULT_STORAGE, dataset: str = _Unset("fashion-mnist"), data_dir: str | None = None,
        space: str | None = _Unset(None), epochs: int = _Unset(20), subset: int | None = _Unset(None),
        device: str = "auto", seed: int = _Unset(0), pruner: str = "median", sampler: str = "auto",
        population: str | int = "auto", val_fraction: float = _Unset(0.1), precision: str = "fp32",
        grouping: str = "auto", start: bool = True, workers: str | int = "auto", progress: bool = True):
    """Run (or continue) a study until it holds `trials` finished trials (default 20; with a
    `timeout` and no `trials`, until the time is up); returns the optuna.Study.

    The options are `hpsearch run`'s. Continuing a study needs only its name and the new target:
    dataset, subset, val_fraction, epochs, seed and space left out come from the study, and
    given ones that differ are refused. `progress` shows a progress bar (in a notebook too) and
    a line per trial. Interrupting it (Ctrl-C, or the notebook's stop button) marks the trials in
    training failed and queues them again: the same call continues the study.

    >>> import hpsearch
    >>> study = hpsearch.run(study="demo", trials=3, epochs=2, subset=1000, device="cpu", progress=False)
    >>> len(study.trials), study.best_value > 0.3
    (3, True)
    >>> len(hpsearch.run(study="demo", trials=4, progress=False).trials)   # one more, same settings
    4
    """
    options = {k: v for k, v in locals().items() if k not in ("workers", "progress")}  # first line: the arguments only
    given = tuple(k for k in IDENTITY_OPTIONS if not isinstance(options[k], _Unset))
    options["trials"] = resolve_trials(trials, timeout)
    settings = RunSettings(**{k: v.value if isinstance(v, _Unset) else v for k, v in options.items()}, given=given)
    count = resolve_workers(workers, settings.device)
    if count == 1:
        _run_here(settings, progress)
    else:
        from .workers import run_workers

        echo = print if progress else (lambda line: None)
        code = run_workers(settings, count, echo=echo, echo_err=None if progress else echo)
        if code:
            raise HPSearchError(f"the {count} workers stopped with exit code {code} (see their messages); "
                                f"the same call continues the study")
    return load_study(study, storage)


def _run_here(settings: RunSettings, progress: bool) -> None:
    from .progress import RichReporter
    from .search import run_study

    try:
        run_study(settings, RichReporter() if progress else None)
    except KeyboardInterrupt as exc:
        # run_study has failed and queued the trials in training; the CLI prints what it says
        print(getattr(exc, "message", None) or "interrupted; the same call continues the study", file=sys.stderr)
        raise


def load_study(study: str | None = None, storage: str = DEFAULT_STORAGE):
    """A study of an existing storage as an optuna.Study (`study` None: the storage's only one).

    >>> hpsearch.load_study("demo").study_name   # after the `run` example
    'demo'
    """
    from .study import open_existing_storage, resolve_study

    if study is not None:
        check_study_name(study)
    return resolve_study(open_existing_storage(storage), storage, study)


@dataclass(frozen=True)
class Report:
    """What `report` wrote: the page, the best trial, and (unless retrain=False) its model and test accuracy."""

    index: Path  # results/<study>/index.html
    study: str
    best_trial: int
    validation_accuracy: float  # the best trial's value in the study
    test_accuracy: float | None  # the best model (kept by the search, or retrained) on the test split
    checkpoint: Path | None  # that model: results/<study>/best_model.pt
    # the best [[start]] trial: trial, value and the search's lead over it; when the report tested
    # it (it does unless retrain=False), its test_accuracy and test_lead too; None without starts
    best_start: dict | None = None

    def __fspath__(self) -> str:
        return str(self.index)


def report(study: str | None = None, *, storage: str = DEFAULT_STORAGE, out: str | os.PathLike | None = None,
           retrain: bool | None = None, importance: str = "ped-anova", device: str = "auto",
           data_dir: str | None = None, artifact: bool = True, log: Callable[[str], None] | None = print) -> Report:
    """Write a study's report folder (default results/<study>/); returns a `Report`.

    The options are `hpsearch report`'s (see `hpsearch.report.write_report`): `retrain` None
    retrains the best trial only when neither the folder nor the search's kept models hold its
    model, True always, False never (no test accuracy, no checkpoint). `log` receives the progress lines (None: silent).

    >>> result = hpsearch.report("demo", log=None)   # after the `run` example
    >>> result.index.name, result.checkpoint.name, 0.3 < result.test_accuracy <= 1
    ('index.html', 'best_model.pt', True)
    """
    from .report import write_report

    index = write_report(study, storage, out, retrain=retrain, importance=importance, device=device,
                         data_dir=data_dir, artifact=artifact, log=log or (lambda message: None))
    summary = json.loads((index.parent / "summary.json").read_text())
    best_json = index.parent / "best.json"
    best = json.loads(best_json.read_text()) if retrain is not False and best_json.is_file() else None
    checkpoint = index.parent / "best_model.pt"
    return Report(index=index, study=summary["study"], best_trial=summary["best_trial"],
                  validation_accuracy=summary["best_value"],
                  test_accuracy=best["test_accuracy"] if best else None,
                  checkpoint=checkpoint if best and checkpoint.is_file() else None,
                  best_start=summary.get("best_start"))


def checkpoint_for(checkpoint: str | os.PathLike | None = None, study: str | None = None,
                   storage: str = DEFAULT_STORAGE,
                   results_dir: str | os.PathLike = RESULTS_DIR) -> tuple[Path, str | None]:
    """(checkpoint file, study name or None): the given file, else the checkpoint of the study's best
    trial (kept by `hpsearch run`, or made by `hpsearch report`; `study` None: the storage's only study)."""
    if checkpoint is not None and study is not None:
        raise HPSearchError("give either --checkpoint PATH or --study NAME, not both")
    if checkpoint is not None:
        return Path(checkpoint), None
    from .study import find_study_checkpoint, open_existing_storage, resolve_study

    if study is not None:
        check_study_name(study)
    try:
        name = resolve_study(open_existing_storage(storage), storage, study).study_name
    except HPSearchError as exc:
        if study is not None:
            raise
        raise HPSearchError(f"{exc}; or give --checkpoint PATH") from None  # the other way to say what to use
    return find_study_checkpoint(name, storage, results_dir), name


@dataclass(frozen=True)
class ExportPlan:
    checkpoint: Path  # what to export
    out: Path  # where to write it
    study: str | None  # the study whose best checkpoint it is, None for a given file


def export_plan(checkpoint: str | os.PathLike | None, fmt: str, out: str | os.PathLike | None = None,
                study: str | None = None, storage: str = DEFAULT_STORAGE,
                results_dir: str | os.PathLike = RESULTS_DIR) -> ExportPlan:
    """The defaults of `hpsearch export` and `hpsearch.export`.

    Without a checkpoint: the study's best (see `checkpoint_for`), written to
    results/<study>/best_model.onnx (.ts for torchscript, best_model.export.pt for pt). With a
    checkpoint and no `out`: beside it, named after it, with the format's ending.
    """
    if fmt not in EXPORT_SUFFIXES:
        raise HPSearchError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_SUFFIXES)}")
    source, name = checkpoint_for(checkpoint, study, storage, results_dir)
    if out is not None:
        target = Path(out)
    elif name is not None:
        target = Path(results_dir) / results_name(name) / f"best_model{EXPORT_SUFFIXES[fmt]}"
    else:
        target = source.with_name(source.stem + EXPORT_SUFFIXES[fmt])
        if target.resolve() == source.resolve():  # e.g. a checkpoint named model.onnx
            target = source.with_name(f"{source.stem}.export{EXPORT_SUFFIXES[fmt]}")
    if target.resolve() == source.resolve():
        raise HPSearchError(f"--out {target} is the checkpoint itself; give another file")
    return ExportPlan(source, target, name)


def export(*, format: str = "onnx", out: str | os.PathLike | None = None,  # noqa: A002 - the flag's name
           checkpoint: str | os.PathLike | None = None, study: str | None = None,
           storage: str = DEFAULT_STORAGE) -> Path:
    """Export a checkpoint as onnx, torchscript or pt (a checked copy); returns the file written.

    Defaults as `hpsearch export` (see `export_plan`): the best model of the storage's only study,
    to results/<study>/best_model.onnx. The model takes float images [N, 1, 28, 28] in [0, 1]
    and returns logits.

    >>> hpsearch.export(format="torchscript", study="demo")   # after the `report` example
    PosixPath('results/demo/best_model.ts')
    """
    from .export import export_model

    plan = export_plan(checkpoint, format, out, study, storage)
    return export_model(plan.checkpoint, format, plan.out)


def predict(images: str | os.PathLike | Iterable[str | os.PathLike], *, checkpoint: str | os.PathLike | None = None,
            study: str | None = None, storage: str = DEFAULT_STORAGE, **options) -> list:
    """Classify image files: a list of `hpsearch.export.Prediction` (image, index, label,
    probability, top), one per image. Without `checkpoint`: the best model of `study` (default:
    the storage's only study). Other keyword options go to `hpsearch.export.predict_images`
    (e.g. `invert`, `resize`, `top`).

    >>> from PIL import Image
    >>> data = hpsearch.load_dataset("fashion-mnist", subset=100)
    >>> Image.fromarray((data.test_x[0] * 255).byte().view(28, 28).numpy()).save("boot.png")
    >>> (prediction,) = hpsearch.predict("boot.png", study="demo", top=2)   # after the `report` example
    >>> prediction.image, prediction.label in data.classes, len(prediction.top)
    ('boot.png', True, 2)
    """
    from .export import predict_images

    parameters = inspect.signature(predict_images).parameters
    known = set(parameters) - {"paths", "checkpoint"}
    unknown = sorted(set(options) - known)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    if unknown and not takes_any:
        raise HPSearchError(f"unknown predict option {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    source, _ = checkpoint_for(checkpoint, study, storage)
    return predict_images(paths, source, **options)

"""The Optuna side: storage, study, sampler, pruner, and the ask/report/prune/tell loop.

This is the only module that imports Optuna. It asks trials, turns their params into
`TrainConfig`s, and feeds them to a `PopulationTrainer`, which trains up to K of them at once.
After every epoch each member's validation accuracy is reported as the trial's intermediate
value; the pruner decides who leaves, and a newly asked trial takes the free slot, so the device
never waits for the slowest trial. TPE sees the running trials through the constant liar.

`--trials N` is the number of finished (complete or pruned) trials the *study* should hold:
re-running the same command continues the study up to N, and never redoes finished trials.
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from . import __version__
from .data import DATASET_NAMES, Dataset, load_dataset
from .errors import HPSearchError
from .space import Param, Space, load_space
from .train import PopulationTrainer, TrainConfig, default_device

DEFAULT_STORAGE = "sqlite:///studies/hpsearch.db"
DEFAULT_STUDY = "hpsearch"
PRUNERS = ("median", "hyperband", "none")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Settings that define what a study measures: a resumed study must keep them.
_IDENTITY_ATTRS = ("dataset", "subset", "val_fraction", "epochs", "seed", "space")


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

    def validate(self) -> None:
        if self.trials < 1:
            raise HPSearchError(f"--trials must be at least 1, got {self.trials}")
        if self.epochs < 1:
            raise HPSearchError(f"--epochs must be at least 1, got {self.epochs}")
        if self.timeout is not None and self.timeout <= 0:
            raise HPSearchError(f"--timeout must be positive, got {self.timeout}")
        if self.dataset not in DATASET_NAMES:
            raise HPSearchError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
        if self.pruner not in PRUNERS:
            raise HPSearchError(f"unknown pruner {self.pruner!r}; choose one of {', '.join(PRUNERS)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise HPSearchError(f"unknown device {self.device!r}; use auto, cpu or cuda[:N]")
        check_study_name(self.study)
        population_size(self.population, torch.device("cpu"), self.trials)  # validates


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
    def finish(self, summary: RunSummary) -> None: ...


# ----------------------------------------------------------------------------------------------
# Storage and study


def check_study_name(name: str) -> None:
    # Study names become directory names under results/: no separators, no "..", no hidden files.
    if not STUDY_NAME_RE.match(name) or ".." in name:
        raise HPSearchError(f"invalid study name {name!r}: use letters, digits, '_', '-' and '.', "
                            f"starting with a letter or digit, without '..'")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for a URL; SQLite gets its parent directory and a patient lock timeout."""
    try:
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///"):])
            if str(path) not in ("", ":memory:"):
                path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        if url.startswith(("journal:", "journal+file:")):
            file = url.split(":", 1)[1].removeprefix("//")
            Path(file).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(file))
        return optuna.storages.RDBStorage(url)
    except HPSearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors of every kind
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HPSearchError(f"cannot open storage {url!r}: {msg[:200]}") from None


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        # Five full trials before pruning anyone, and never before the 2nd epoch.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=min(1, epochs - 1))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def open_study(settings: RunSettings, space: Space) -> optuna.Study:
    storage = open_storage(settings.storage)
    try:
        study = optuna.create_study(study_name=settings.study, storage=storage,
                                    pruner=make_pruner(settings.pruner, settings.epochs),
                                    direction="maximize", load_if_exists=True)
    except Exception as exc:  # noqa: BLE001
        raise HPSearchError(f"cannot open study {settings.study!r} in {settings.storage}: {exc}") from None
    # Seeded by (seed, trials so far): a resumed run must not replay the first run's samples.
    n_before = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(
        seed=(settings.seed * 1_000_003 + n_before) % 2**32, multivariate=True, constant_liar=True)
    identity = {
        "dataset": settings.dataset, "subset": settings.subset, "val_fraction": settings.val_fraction,
        "epochs": settings.epochs, "seed": settings.seed, "space": space.to_dict(),
    }
    existing = study.user_attrs
    if "dataset" in existing:
        for key in _IDENTITY_ATTRS:
            if existing.get(key) != identity[key]:
                flag = "--space" if key == "space" else f"--{key.replace('_', '-')}"
                raise HPSearchError(
                    f"study {settings.study!r} was created with {key} = {json.dumps(existing.get(key))[:80]}, "
                    f"not {json.dumps(identity[key])[:80]}; rerun with the same {flag} or pick a new --study")
    else:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        study.set_user_attr("data_dir", settings.data_dir)
        study.set_user_attr("hpsearch_version", __version__)
        study.set_user_attr("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return study


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
    trial_seed = (seed * 1_000_003 + trial.number) % 2**31
    return TrainConfig.from_params({**space.fixed, **params}, epochs=epochs, seed=trial_seed)


def _finished_count(study: optuna.Study, include_running: bool) -> int:
    states = FINISHED + ((TrialState.RUNNING,) if include_running else ())
    return len(study.get_trials(deepcopy=False, states=states))


def run_study(settings: RunSettings, reporter: Reporter | None = None) -> RunSummary:
    """Run (or continue) a study until it holds `settings.trials` finished trials or time is up."""
    settings.validate()
    reporter = reporter or Reporter()
    space = load_space(settings.space)
    try:
        device = default_device(settings.device)
    except ValueError as exc:
        raise HPSearchError(str(exc)) from None
    study = open_study(settings, space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    data = load_dataset(settings.dataset, settings.data_dir, device, settings.val_fraction,
                        settings.subset, settings.seed)
    K = population_size(settings.population, device, settings.trials)
    trainer = PopulationTrainer(data)
    label = device_label(device)
    study.set_user_attr("dataset_info", data.describe())

    already = _finished_count(study, include_running=False)
    reporter.start(settings, data, already, K)
    start = time.perf_counter()
    active: dict[int, _ActiveTrial] = {}
    clock = {"sample": 0.0, "train": 0.0, "storage": 0.0}
    run_count = 0
    stopped_by = "trials"
    n_train = len(data.train_y)

    def out_of_time() -> bool:
        return settings.timeout is not None and time.perf_counter() - start >= settings.timeout

    try:
        while True:
            # Fill free slots, counting trials other workers are running against the target.
            while len(active) < K and not out_of_time() and \
                    _finished_count(study, include_running=True) < settings.trials:
                t0 = time.perf_counter()
                trial = study.ask()
                config = _config_for(trial, space, settings.epochs, settings.seed)
                active[trial.number] = _ActiveTrial(trial, config)
                trainer.add(trial.number, config)
                clock["sample"] += time.perf_counter() - t0
            if not active:
                if out_of_time():
                    stopped_by = "timeout"
                break
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
                reason = result.diverged
                if reason is None and math.isfinite(result.val_acc):
                    trial.report(result.val_acc, result.epoch)
                if reason is None and not result.finished and (trial.should_prune() or out_of_time()):
                    reason = "pruned" if not out_of_time() else "timeout"
                    trainer.remove(result.key)
                if reason is None and not result.finished:
                    continue
                state = TrialState.COMPLETE if reason is None else TrialState.PRUNED
                _record(trial, at, result.epoch, data, label, reason)
                value = result.val_acc if state == TrialState.COMPLETE else None
                study.tell(trial, value, state=state)
                del active[result.key]
                run_count += 1
                best = _best_value(study)
                reporter.trial_finished(
                    TrialOutcome(trial.number, state.name, result.val_acc, result.epoch,
                                 sum(at.epoch_seconds) / len(at.epoch_seconds), trial.params, reason),
                    best, already + run_count)
            clock["storage"] += time.perf_counter() - t1
    finally:
        # Interrupted (Ctrl-C, an error): trials still training are marked failed, never left RUNNING.
        for at in active.values():
            try:
                at.trial.set_user_attr("stop_reason", "interrupted")
                study.tell(at.trial, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001 - best effort while already unwinding
                pass

    wall = time.perf_counter() - start
    best_trial = _best_trial(study)
    summary = RunSummary(
        study=settings.study, storage=settings.storage, trials_run=run_count,
        finished_in_study=_finished_count(study, include_running=False),
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
        "best_val_acc": max(at.curves["val_acc"]),
        "best_epoch": 1 + at.curves["val_acc"].index(max(at.curves["val_acc"])),
        "curves": {k: [round(v, 6) if math.isfinite(v) else None for v in vs] for k, vs in at.curves.items()},
        "config": config.to_dict(),
        "stop_reason": reason or "completed",
        "versions": {"hpsearch": __version__, "torch": torch.__version__, "optuna": optuna.__version__},
    }
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def _best_trial(study: optuna.Study):
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


def _best_value(study: optuna.Study) -> float | None:
    best = _best_trial(study)
    return best.value if best else None

"""Every attribute hpsearch writes into a study, named once, and the plain records read back.

The run loop writes through `TrialRecord` and `StudyAttr`; `report/` reads `TrialRow`s that
`view.py` builds with the same names. Renaming an attribute here renames it on both sides, so
a chart can no longer go blank because a writer and a reader spell a key differently.
Optuna-free: a `TrialRow` is hpsearch's own copy of what a report needs from a trial.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime


class StudyAttr:
    """Study user attributes."""

    DATASET = "dataset"
    SUBSET = "subset"
    VAL_FRACTION = "val_fraction"
    EPOCHS = "epochs"
    SEED = "seed"
    SPACE = "space"
    DATA_DIR = "data_dir"
    VERSION = "hpsearch_version"
    CREATED = "created"
    DATASET_INFO = "dataset_info"
    SAMPLER = "sampler"  # of the latest run (tpe, random, gp)
    PRUNER = "pruner"  # of the latest run
    FAMILY = "family"  # the model family the space builds: mlp, cnn, or mlp|cnn when sampled


# Long values live in study *system* attributes (as "hpsearch:" + name), so `optuna studies` and
# the dashboard show a short user-attribute table; a study written before keeps them as user
# attributes, which `study_attrs` reads too.
LONG_STUDY_ATTRS = (StudyAttr.SPACE, StudyAttr.DATASET_INFO, StudyAttr.DATA_DIR)


def _system_key(name: str) -> str:
    return "hpsearch:" + name


def study_attrs(storage, study_id: int) -> dict:
    """Every hpsearch study attribute by its StudyAttr name, wherever it is stored."""
    attrs = dict(storage.get_study_user_attrs(study_id))
    system = storage.get_study_system_attrs(study_id)
    attrs.update({name: system[_system_key(name)] for name in LONG_STUDY_ATTRS if _system_key(name) in system})
    return attrs


# How long to wait for a study's creator to finish writing what the study measures (its identity
# attributes are written one by one, `created` last; a worker started beside it may look between).
IDENTITY_WAIT_S = 15.0


def settled_study_attrs(storage, study_id: int, wait: bool) -> dict | None:
    """What the study's creator recorded it measures, or None for an empty study nobody claimed
    (made with Optuna's own API: hpsearch adopts it). With `wait`, a study whose identity is being
    written (dataset there, `created` not yet) is read again until it is complete: seen in CI,
    a worker of four started together read the dataset without the space and refused the study."""
    deadline = time.monotonic() + (IDENTITY_WAIT_S if wait else 0.0)
    while True:
        attrs = study_attrs(storage, study_id)
        if StudyAttr.CREATED in attrs or StudyAttr.DATASET in attrs and not wait:
            return attrs
        if time.monotonic() >= deadline:
            return attrs if StudyAttr.DATASET in attrs else None
        time.sleep(0.2)


def set_study_attr(storage, study_id: int, name: str, value) -> None:
    """Write a StudyAttr where `study_attrs` reads it (long ones as system attributes)."""
    if name in LONG_STUDY_ATTRS:
        storage.set_study_system_attr(study_id, _system_key(name), value)
    else:
        storage.set_study_user_attr(study_id, name, value)


def foreign_reason(directions: list[str], user_attrs: dict, n_trials: int) -> str | None:
    """Why a study is not one hpsearch made (None if it is, or if it is empty and maximizes one value,
    so hpsearch may adopt it). `directions` by name, as Optuna's StudyDirection names them."""
    if len(directions) != 1:
        return f"it has {len(directions)} objectives"
    if directions[0] != "MAXIMIZE":
        return "it minimizes its objective; hpsearch maximizes validation accuracy"
    if n_trials and StudyAttr.DATASET not in user_attrs:
        return f"its {n_trials} trials were not made by hpsearch"
    return None


# What a study measures: a resumed run must keep these (the CLI flag is `--` + name with dashes).
IDENTITY = (StudyAttr.DATASET, StudyAttr.SUBSET, StudyAttr.VAL_FRACTION, StudyAttr.EPOCHS, StudyAttr.SEED,
            StudyAttr.SPACE)

METRIC = "val_accuracy"  # the objective's name (Optuna's metric names)

# Study system attribute: how many runs have started (seeds their samplers).
RUNS = "hpsearch:runs"
# Trial system attributes.
HEARTBEAT = "hpsearch:heartbeat"  # epoch seconds, on storages without Optuna's heartbeat table
WORKER = "hpsearch:worker"  # "host:pid" of the process running the trial
# Optuna's RetryHeartbeatStaleTrialCallback names, so its `retried_trial_number` works on our studies.
FAILED_TRIAL = "failed_trial"  # the first trial of a chain of retries (its seed is the retry's seed)
RETRY_HISTORY = "retry_history"


class TrialAttr:
    """Trial user attributes (the fields of `TrialRecord`, plus the two written outside it)."""

    EPOCHS_RUN = "epochs_run"
    SECONDS_PER_EPOCH = "seconds_per_epoch"
    PARAM_COUNT = "param_count"
    DEVICE = "device"
    SEED = "seed"
    POPULATION = "population"
    TRAIN_LOSS = "train_loss"
    TRAIN_ACC = "train_acc"
    VAL_LOSS = "val_loss"
    BEST_VAL_ACC = "best_val_acc"
    BEST_EPOCH = "best_epoch"
    CURVES = "curves"
    CONFIG = "config"
    STOP_REASON = "stop_reason"  # also set on failed trials: "interrupted", "surplus", "worker lost..."
    VERSIONS = "versions"
    TRAIN_PATH = "train_path"  # what trained it: "cuda-graph", "eager" or "eager (graph check failed)"
    RETRY_OF = "retry_of"  # on a queued retry: the number of the trial it retries
    START = "hpsearch:start"  # on a starting configuration: its 1-based index among the space's [[start]]s


COMPLETED = "completed"  # the stop reason of a trial that ran its whole budget


@dataclass
class TrialRecord:
    """What a finished (complete or pruned) trial records; field names are the attribute names."""

    epochs_run: int
    seconds_per_epoch: float
    param_count: int
    device: str
    seed: int
    population: int
    train_loss: float
    train_acc: float
    val_loss: float
    best_val_acc: float
    best_epoch: int
    curves: dict
    config: dict
    stop_reason: str
    versions: dict
    train_path: str | None = None  # None: not recorded

    def __post_init__(self) -> None:
        assert set(asdict(self)) <= set(vars(TrialAttr).values()), "a TrialRecord field has no TrialAttr name"

    def to_attrs(self) -> dict:
        """The user attributes to store: NaN and inf become None (they do not survive JSON storage)."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}


@dataclass
class TrialRow:
    """One trial as a report reads it, whoever made the study."""

    number: int
    state: str  # COMPLETE, PRUNED, RUNNING, FAIL, WAITING
    value: float | None
    params: dict
    intermediate: dict[int, float]  # epoch -> validation accuracy reported to the pruner
    attrs: dict = field(default_factory=dict)  # user attributes
    datetime_start: datetime | None = None
    datetime_complete: datetime | None = None

    @property
    def seconds(self) -> float | None:
        if self.datetime_start is None or self.datetime_complete is None:
            return None
        return (self.datetime_complete - self.datetime_start).total_seconds()

    @property
    def param_count(self) -> int | None:
        return self.attrs.get(TrialAttr.PARAM_COUNT)

    @property
    def best_val_acc(self) -> float | None:
        return self.attrs.get(TrialAttr.BEST_VAL_ACC)

    @property
    def device(self) -> str | None:
        return self.attrs.get(TrialAttr.DEVICE)

    @property
    def config(self) -> dict | None:
        config = self.attrs.get(TrialAttr.CONFIG)
        return config if isinstance(config, dict) else None

    @property
    def seed(self) -> int | None:
        return self.attrs.get(TrialAttr.SEED)

    @property
    def start(self) -> int | None:
        """The index of the [[start]] configuration this trial ran, None for a sampled trial."""
        return self.attrs.get(TrialAttr.START)

    @property
    def versions(self) -> dict | None:
        return self.attrs.get(TrialAttr.VERSIONS)

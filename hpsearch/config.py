"""What a run is asked to do: `RunSettings`, its defaults and validation, and every "auto" resolved.

Torch-free and Optuna-free at import, so the CLI can check flags before loading either. A `run`
flag is spelled twice in the code base: as a CLI option in `cli.py` and as a field here. Worker
processes get the settings as one JSON value (`to_json` / `from_json`), never rebuilt flag by flag.

Every "auto" is resolved here, in one place (the resolvers import torch only when called):

1. `resolve_device`: a CUDA GPU if one is visible, else the CPU.
2. `population_size`: members trained as one computation (1 on a CPU, 32 on a GPU).
3. `resolve_grouping`: which members share a computation (exact shapes on a CPU, batch on a GPU).
4. `resolve_workers` / `worker_devices`: processes sharing the study (one per GPU when several).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from dataclasses import dataclass

from .errors import HPSearchError

DEFAULT_STORAGE = "sqlite:///studies/hpsearch.db"
DEFAULT_STUDY = "hpsearch"
DEFAULT_TRIALS = 20  # without --timeout; with --timeout and no --trials, the time alone bounds a run
DATASET_NAMES = ("mnist", "fashion-mnist", "kmnist", "idx")
PRUNERS = ("median", "median-margin", "halving", "hyperband", "none")  # hpsearch/study/pruners.py
# auto = tpe: multivariate TPE with the constant liar, so parallel trials do not crowd one point.
# random: the baseline a search must beat. gp: Optuna's Gaussian-process sampler (needs scipy).
SAMPLERS = ("auto", "tpe", "random", "gp")
# fp32: exact float32 matmuls. tf32: TensorFloat-32 matmuls on Ampere+ GPUs (10-bit mantissa
# inputs, fp32 accumulate). bf16: forward/backward matmuls under bfloat16 autocast; weights,
# optimizer state and the loss stay fp32. GPU only: on a CPU they would only cost time.
PRECISIONS = ("fp32", "tf32", "bf16")
# Which population members share one stacked computation (all need the same batch size):
#   batch   pad widths to the widest member and pass through missing layers (fewest groups)
#   width   also split by power-of-two width bucket (padding at most 2x, more groups)
#   shape   exact depth and width (no padding at all, most groups)
# Fewer groups mean fewer launches; padding means wasted FLOPs. `hpsearch bench` times all three.
GROUPINGS = ("batch", "width", "shape")
MAX_WORKERS = 256
_STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CLI_DEBUG: list[bool] = []  # set by the CLI: [--debug]; empty when hpsearch is used as a library


def set_cli_debug(on: bool) -> None:
    _CLI_DEBUG[:] = [bool(on)]


def cli_debug() -> bool | None:
    """--debug as the CLI set it, or None when no CLI is running (a library user's own logging rules)."""
    return _CLI_DEBUG[0] if _CLI_DEBUG else None


def check_study_name(name: str) -> None:
    """Study names become directory names under results/: no separators, no "..", no hidden files."""
    if not isinstance(name, str) or not _STUDY_NAME_RE.fullmatch(name) or ".." in name:
        raise HPSearchError(f"invalid study name {name!r}: use letters, digits, '_', '-' and '.', "
                            f"starting with a letter or digit, without '..'")


def results_name(name: str) -> str:
    """A study name that becomes results/<name>/, wherever it came from (a database may hold
    `../../x`): the name, or a one-line error saying to choose the folder."""
    try:
        check_study_name(name)
    except HPSearchError:
        shown = name[:60] + ("..." if len(name) > 60 else "")
        raise HPSearchError(f"study {shown!r} cannot name a folder under results/ (letters, digits, '_', '-', '.'); "
                            f"give --out DIR") from None
    return name


@dataclass
class RunSettings:
    """The settings of `hpsearch run`, one field per flag (`--val-fraction` is `val_fraction`)."""

    trials: int | None = DEFAULT_TRIALS  # None: no limit (needs a timeout); see resolve_trials
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
    sampler: str = "auto"  # not part of the study's identity: a later run may sample differently
    population: str | int = "auto"
    val_fraction: float = 0.1
    precision: str = "fp32"  # not part of the study's identity: it changes speed, not what is measured
    grouping: str = "auto"
    start: bool = True  # a new study runs the space's [[start]] configurations first
    # Which of the study-identity settings (dataset, subset, val_fraction, epochs, seed, space) the
    # user set. Those not set are taken from an existing study (`hpsearch run --study s --trials
    # 50` continues s as it was made). None: all set (the strict library default).
    given: tuple[str, ...] | None = None

    def validate(self) -> None:
        """One line naming the flag for the first bad value."""
        if self.grouping != "auto" and self.grouping not in GROUPINGS:
            raise HPSearchError(f"unknown grouping {self.grouping!r}; choose auto or one of {', '.join(GROUPINGS)}")
        _one_of("--precision", self.precision, PRECISIONS)
        _one_of("--dataset", self.dataset, DATASET_NAMES)
        _one_of("--pruner", self.pruner, PRUNERS)
        _one_of("--sampler", self.sampler, SAMPLERS)
        if self.sampler == "gp" and importlib.util.find_spec("scipy") is None:  # Optuna's GPSampler fits with it
            raise HPSearchError("--sampler gp needs scipy: pip install scipy (or use --sampler tpe)")
        if self.trials is None and self.timeout is None:
            raise HPSearchError("give --trials or --timeout: a study needs a target or a time limit")
        if self.trials is not None and self.trials < 1:
            raise HPSearchError(f"--trials must be at least 1, got {self.trials}")
        if self.epochs < 1:
            raise HPSearchError(f"--epochs must be at least 1, got {self.epochs}")
        if self.subset is not None and self.subset < 20:  # the upper bound needs the data: data.py checks it
            raise HPSearchError(f"--subset must be between 20 and the number of training images, got {self.subset}")
        if self.timeout is not None and not self.timeout > 0:
            raise HPSearchError(f"--timeout must be positive, got {self.timeout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise HPSearchError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise HPSearchError(f"unknown device {self.device!r}; use auto, cpu or cuda[:N]")
        check_study_name(self.study)
        _population_request(self.population)

    @property
    def trial_target(self) -> float:
        """Finished trials to reach: --trials, or infinity when only --timeout bounds the run."""
        return math.inf if self.trials is None else self.trials

    def finished_text(self, finished: int) -> str:
        """'12 of 20' (or '12' without a target), for '... trials finished'."""
        return str(finished) if self.trials is None else f"{finished} of {self.trials}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        values = json.loads(text)
        if not isinstance(values, dict) or set(values) - known:
            raise HPSearchError("worker settings are not a RunSettings JSON object")
        if values.get("given") is not None:
            values["given"] = tuple(values["given"])
        return cls(**values)


def _one_of(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise HPSearchError(f"unknown {flag.lstrip('-')} {value!r}; choose one of {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------
# Resolving "auto"


def resolve_device(requested: str = "auto"):
    """auto: the first CUDA GPU if one is visible, else the CPU. Raises ValueError for a missing GPU."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    return device


def _population_request(requested: str | int) -> int | None:
    """The population size a user asked for, None for auto; one line for anything else."""
    if requested == "auto":
        return None
    try:
        k = int(requested)
    except (TypeError, ValueError):
        raise HPSearchError(f"--population must be a positive integer or 'auto', got {requested!r}") from None
    if k < 1:
        raise HPSearchError(f"--population must be at least 1, got {k}")
    return k


def resolve_trials(trials: int | None, timeout: float | None) -> int | None:
    """--trials left out: 20, or no limit when --timeout is given (`hpsearch run --timeout 600`
    searches for 10 minutes, as Optuna's optimize(timeout=600) does)."""
    if trials is not None:
        return trials
    return None if timeout is not None else DEFAULT_TRIALS


def population_size(requested: str | int, device, trials: float) -> int:
    """K members trained at once. auto: 1 on a CPU (no gain there), 32 on a GPU."""
    k = _population_request(requested)
    if k is None:
        k = 32 if device.type == "cuda" else 1
    return int(max(1, min(k, trials)))


def resolve_sampler(requested: str) -> str:
    """auto: TPE (compared against random search by benchmarks/search.py)."""
    return "tpe" if requested == "auto" else requested


def resolve_grouping(requested: str, device) -> str:
    """auto: exact shapes on a CPU (padding is pure waste there: 5x slower for a mixed population
    measured with `hpsearch bench --mixed 8`), padded groups by batch size on a GPU (fewer groups,
    fewer launches; to be confirmed by `hpsearch bench --device cuda`)."""
    if requested != "auto":
        return requested
    return "batch" if device.type == "cuda" else "shape"


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_workers(requested: str | int, device: str) -> int:
    """auto: one worker per GPU when several are visible (and --device is auto or cuda), else 1."""
    if requested == "auto":
        gpus = _gpu_count() if device in ("auto", "cuda") else 0
        return gpus if gpus > 1 else 1
    try:
        n = int(requested)
    except (TypeError, ValueError):
        raise HPSearchError(f"--workers must be a positive integer or 'auto', got {requested!r}") from None
    if not 1 <= n <= MAX_WORKERS:
        raise HPSearchError(f"--workers must be between 1 and {MAX_WORKERS}, got {n}")
    return n


def worker_devices(device: str, workers: int) -> list[str]:
    """Worker i's device: cuda:i round-robin over the GPUs for auto/cuda, else the given device."""
    if device in ("auto", "cuda"):
        gpus = _gpu_count()
        if gpus:
            return [f"cuda:{i % gpus}" for i in range(workers)]
        if device == "cuda":
            raise HPSearchError("--device cuda: no CUDA GPU is visible")
        return ["cpu"] * workers
    return [device] * workers


def device_label(device) -> str:
    """The device as the study records it: "cuda:0:<GPU name>" or "cpu:<processor> x<threads>"."""
    import platform

    import torch

    if device.type == "cuda":
        return f"{device}:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()}"

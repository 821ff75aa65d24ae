"""Plain, JSON-able descriptions of a network and of a training run; no torch here.

`Architecture` holds the four fields a model and a trial share. `ModelSpec` adds what the data
fixes (input size, classes, normalization) and rebuilds a network from a checkpoint;
`TrainConfig` adds how one trial trains. Parsing a space file or a study's settings needs only
these, so neither loads PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

ACTIVATION_NAMES = ("relu", "sigmoid", "tanh", "leaky_relu")
OPTIMIZERS = ("adamw", "sgd")
# constant: the learning rate as given. cosine: linear warm-up over the first 5% of the trial's
# steps, then cosine decay towards zero (reached one step past the last, as torch's LambdaLR
# with the same function; see `lr_factor`).
SCHEDULES = ("constant", "cosine")


def _known_fields(cls, values: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


@dataclass(frozen=True)
class Architecture:
    """The seeds' MLP: `num_layers` Linear layers *including* the output one (2 = one hidden layer),
    each hidden layer `layer_size` wide with the same activation, optionally followed by dropout."""

    num_layers: int = 3
    layer_size: int = 128
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.layer_size < 1:
            raise ValueError(f"layer_size must be >= 1, got {self.layer_size}")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATION_NAMES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def architecture(self) -> Architecture:
        return Architecture(self.num_layers, self.layer_size, self.activation, self.dropout)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        """Build from a dict that may hold other keys (a trial's params, a checkpoint's config)."""
        return cls(**_known_fields(cls, {**d, **overrides}))


@dataclass(frozen=True)
class ModelSpec(Architecture):
    """Everything needed to rebuild a network; checkpoints store it, so they never pickle code."""

    in_features: int = 784
    num_classes: int = 10
    mean: float = 0.0  # input normalization, taken from the training split
    std: float = 1.0

    @property
    def widths(self) -> list[int]:
        """Feature counts from input to output: len == num_layers + 1."""
        return [self.in_features] + [self.layer_size] * (self.num_layers - 1) + [self.num_classes]

    def param_count(self) -> int:
        w = self.widths
        return sum(a * b + b for a, b in zip(w[:-1], w[1:]))


@dataclass(frozen=True)
class TrainConfig(Architecture):
    """One trial: the model's shape and how to train it."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    momentum: float = 0.9  # SGD only
    epochs: int = 20
    seed: int = 0
    # The defaults are the recipe every earlier study trained with, so their configs still
    # reproduce; the shipped space fixes the measured better recipe (see studies/mlp.toml).
    schedule: str = "constant"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"invalid training config {self}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "TrainConfig":
        return cls.from_dict(params, **overrides)

    def model_spec(self, data) -> ModelSpec:
        """The network this config trains on `data` (anything with in_features, num_classes, mean, std)."""
        return ModelSpec(self.num_layers, self.layer_size, self.activation, self.dropout,
                         data.in_features, data.num_classes, data.mean, data.std)


def warmup_steps(total_steps: int) -> int:
    """Warm-up length of the cosine schedule: 5% of the steps (one epoch of a 20-epoch trial)."""
    return max(1, math.ceil(total_steps / 20))


def lr_factor(step: int, total_steps: int, schedule: str) -> float:
    """The learning-rate multiplier for 0-based optimizer step `step` of `total_steps`.

    The trainer computes the same on the device for every member at once; this is the reference
    (tests check the trainer against torch.optim with a LambdaLR of this function).
    """
    if schedule == "constant":
        return 1.0
    warm = warmup_steps(total_steps)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

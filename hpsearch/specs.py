"""Plain, JSON-able descriptions of a network and of a training run; no torch here.

`Architecture` holds the fields a model and a trial share: the family (`mlp`, the seeds'
flexible MLP, or `cnn`, their small convolutional network) and its shape. `ModelSpec` adds what the data
fixes (input size, classes, normalization) and rebuilds a network from a checkpoint;
`TrainConfig` adds how one trial trains. Parsing a space file or a study's settings needs only
these, so neither loads PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

ACTIVATION_NAMES = ("relu", "sigmoid", "tanh", "leaky_relu")
OPTIMIZERS = ("adamw", "sgd")
FAMILIES = ("mlp", "cnn")
POOLINGS = ("max", "avg")
KERNEL_SIZES = (3, 5, 7)
MAX_CONV_BLOCKS = 4
# default: PyTorch's (every weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))). normal: the
# seeds' CNN script: Linear weights N(0, 1/sqrt(fan_in)), Linear biases zero, convolutions default.
INITS = ("default", "normal")
# constant: the learning rate as given. cosine: linear warm-up over the first 5% of the trial's
# steps, then cosine decay towards zero (reached one step past the last, as torch's LambdaLR
# with the same function; see `lr_factor`).
SCHEDULES = ("constant", "cosine")

# What a stored spec (a checkpoint's) may ask for: the search space's bounds (space.py's rules) and
# images up to 1024 pixels a side (the datasets' are 28), so a file's header cannot make a loader
# build a network, or an image buffer, that no search here could have made.
MAX_IMAGE_SIDE = 1024
STORED_SPEC_BOUNDS = {
    "num_layers": (1, 32), "layer_size": (1, 16384), "conv_blocks": (1, MAX_CONV_BLOCKS), "channels": (1, 1024),
    "kernel_size": (1, max(KERNEL_SIZES)), "in_features": (1, MAX_IMAGE_SIDE**2), "num_classes": (1, 65536),
    "height": (0, MAX_IMAGE_SIDE), "width": (0, MAX_IMAGE_SIDE),  # 0: square, from in_features
}
STORED_SPEC_FLOATS = ("dropout", "conv_dropout", "mean", "std")


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, allowed))}")


def _known_fields(cls, values: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


@dataclass(frozen=True)
class Architecture:
    """A network's shape.

    mlp (the seeds' MLP): `num_layers` Linear layers *including* the output one (2 = one hidden
    layer), each hidden layer `layer_size` wide with the same activation, optionally followed by
    dropout; with `batch_norm`, each hidden Linear is followed by BatchNorm1d (before the
    activation).
    cnn (the seeds' CNN): `conv_blocks` blocks of convolution (`kernel_size`, "same" padding;
    `channels` in the first block, doubling in each next one, as the seeds' 32 -> 64), activation,
    2x2 pooling and dropout (`conv_dropout`), then the MLP head above on the flattened features.
    """

    num_layers: int = 3
    layer_size: int = 128
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False  # mlp only (the CNN's trainer has no normalization)
    family: str = "mlp"
    conv_blocks: int = 2
    channels: int = 32
    kernel_size: int = 3
    pooling: str = "max"
    conv_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.layer_size < 1:
            raise ValueError(f"layer_size must be >= 1, got {self.layer_size}")
        _one_of("activation", self.activation, ACTIVATION_NAMES)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        _one_of("family", self.family, FAMILIES)
        if type(self.batch_norm) is not bool:  # 1 == True, but a checkpoint must store a bool
            raise ValueError(f"batch_norm must be true or false, got {self.batch_norm!r}")
        if self.batch_norm and self.family != "mlp":
            raise ValueError("batch_norm is for the mlp family only")
        if not 1 <= self.conv_blocks <= MAX_CONV_BLOCKS:
            raise ValueError(f"conv_blocks must be in [1, {MAX_CONV_BLOCKS}], got {self.conv_blocks}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        _one_of("kernel_size", self.kernel_size, KERNEL_SIZES)
        _one_of("pooling", self.pooling, POOLINGS)
        if not 0.0 <= self.conv_dropout < 1.0:
            raise ValueError(f"conv_dropout must be in [0, 1), got {self.conv_dropout}")

    @property
    def conv_channels(self) -> list[int]:
        """Output channels of each convolution block (empty for an MLP)."""
        if self.family != "cnn":
            return []
        return [self.channels * 2**b for b in range(self.conv_blocks)]

    def architecture(self) -> Architecture:
        return Architecture.from_dict(asdict(self))

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
    # The image's height and width (a CNN needs them); 0 = square, from in_features (MLP
    # checkpoints written before the CNN family have neither).
    height: int = 0
    width: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        h, w = self.image_hw
        if h * w != self.in_features:
            raise ValueError(f"image {h}x{w} does not have in_features={self.in_features} pixels")
        if self.family == "cnn" and min(self.feature_hw) < 1:
            raise ValueError(f"{self.conv_blocks} pooling steps leave nothing of a {h}x{w} image")

    @property
    def image_hw(self) -> tuple[int, int]:
        if self.height and self.width:
            return self.height, self.width
        side = int(round(self.in_features ** 0.5))
        return (side, side) if side * side == self.in_features else (1, self.in_features)

    @property
    def feature_hw(self) -> tuple[int, int]:
        """Spatial size after the convolution blocks (each 2x2 pooling floors the size)."""
        h, w = self.image_hw
        for _ in self.conv_channels:
            h, w = h // 2, w // 2
        return h, w

    @property
    def widths(self) -> list[int]:
        """Feature counts of the Linear layers, input to output: len == num_layers + 1."""
        first = self.in_features
        if self.family == "cnn":
            h, w = self.feature_hw
            first = self.conv_channels[-1] * h * w
        return [first] + [self.layer_size] * (self.num_layers - 1) + [self.num_classes]

    def activation_units(self) -> int:
        """Values one sample produces in a forward pass (convolution outputs before pooling, Linear
        outputs): what training keeps per sample for the backward pass."""
        h, w = self.image_hw
        conv = 0
        for channels in self.conv_channels:
            conv += channels * h * w
            h, w = h // 2, w // 2
        # batch norm: its backward keeps a few more values per hidden unit (centred, normalized, ...)
        normalized = 3 * sum(self.widths[1:-1]) if self.batch_norm else 0
        return self.in_features + conv + sum(self.widths[1:]) + normalized

    def param_count(self) -> int:
        w = self.widths
        linear = sum(a * b + b for a, b in zip(w[:-1], w[1:]))
        if self.batch_norm:  # a scale and a shift per hidden unit
            linear += 2 * sum(w[1:-1])
        fans = [1] + self.conv_channels
        conv = sum(a * b * self.kernel_size**2 + b for a, b in zip(fans[:-1], fans[1:]))
        return linear + conv


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_image_shape(value) -> tuple[int, int]:
    """A stored [height, width]: two integers in 1..MAX_IMAGE_SIDE; ValueError (one line) otherwise."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or any(type(v) is not int for v in value)
            or not all(1 <= v <= MAX_IMAGE_SIDE for v in value)):
        raise ValueError(f"image_shape {_short(value)} is not two integers in 1..{MAX_IMAGE_SIDE}")
    return value[0], value[1]


def spec_from_stored(d: dict) -> ModelSpec:
    """A checkpoint's spec, checked before anything is built from it: sizes are integers within
    STORED_SPEC_BOUNDS, floats are finite (std > 0), the image fits MAX_IMAGE_SIDE; ValueError
    (one line) otherwise. Building a ModelSpec allocates nothing, so this is safe on any dict."""
    for name, (low, high) in STORED_SPEC_BOUNDS.items():
        v = d.get(name, low)
        if type(v) is not int or not low <= v <= high:  # bool is an int subclass: refused too
            raise ValueError(f"{name} {_short(v)} is not an integer in {low}..{high}")
    for name in STORED_SPEC_FLOATS:
        v = d.get(name, 0.0)
        if type(v) not in (int, float) or not math.isfinite(v):
            raise ValueError(f"{name} {_short(v)} is not a finite number")
    if type(d.get("batch_norm", False)) is not bool:
        raise ValueError(f"batch_norm {_short(d.get('batch_norm'))} is not true or false")
    if not d.get("std", 1.0) > 0:
        raise ValueError(f"std {_short(d.get('std'))} is not positive")
    spec = ModelSpec.from_dict(d)
    h, w = spec.image_hw
    if not (h <= MAX_IMAGE_SIDE and w <= MAX_IMAGE_SIDE):
        raise ValueError(f"image {h}x{w} is larger than {MAX_IMAGE_SIDE} pixels a side")
    return spec


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
    init: str = "default"
    # Augmentation of the training images, on the device, per member: a random rotation within
    # +-augment_rotate degrees and a random shift within +-augment_shift pixels (0 = none).
    augment_rotate: float = 0.0
    augment_shift: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr <= 0 or self.weight_decay < 0 or self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"invalid training config {self}")
        _one_of("schedule", self.schedule, SCHEDULES)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _one_of("init", self.init, INITS)
        if not 0.0 <= self.augment_rotate <= 180.0 or not 0.0 <= self.augment_shift:
            raise ValueError(f"augmentation out of range: rotate {self.augment_rotate}, shift {self.augment_shift}")

    @property
    def augments(self) -> bool:
        return self.augment_rotate > 0 or self.augment_shift > 0

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "TrainConfig":
        return cls.from_dict(params, **overrides)

    def model_spec(self, data) -> ModelSpec:
        """The network this config trains on `data` (with image_shape, in_features, num_classes, mean, std)."""
        height, width = data.image_shape
        return ModelSpec.from_dict(self.architecture().to_dict(), in_features=data.in_features,
                                   num_classes=data.num_classes, mean=data.mean, std=data.std,
                                   height=height, width=width)


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


def describe_shape(params: dict) -> str:
    """A network's shape in a few characters, from a trial's params or a config's dict:
    "2x128 relu" (MLP layers x width; "2x128 bn relu" with batch norm) or "cnn 2x32c k3 max + 2x128 relu"."""
    norm = "bn " if params.get("batch_norm") else ""
    head = f"{params.get('num_layers', '?')}x{params.get('layer_size', '?')} {norm}{params.get('activation', '')}".strip()
    # A config's dict names its family; a trial's params may not (a space fixes it), but only a
    # CNN space samples conv_blocks.
    family = params.get("family") or ("cnn" if "conv_blocks" in params else "mlp")
    if family != "cnn":
        return head
    conv = (f"cnn {params.get('conv_blocks', '?')}x{params.get('channels', '?')}c k{params.get('kernel_size', '?')} "
            f"{params.get('pooling', '')}").strip()
    return f"{conv} + {head}"

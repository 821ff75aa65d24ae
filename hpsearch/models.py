"""Networks built from a plain dict of sampled parameters.

`NeuralNetwork` is the seeds' flexible MLP: `num_layers` counts the Linear layers *including* the
output layer (num_layers=2 is one hidden layer), every hidden layer has `layer_size` units and the
same activation, optionally followed by dropout. Input normalization is a buffer inside the model,
so a saved model takes raw float images in [0, 1] shaped [N, 1, H, W] and returns logits.

`ConvNet` is the seeds' CNN: blocks of convolution, activation, 2x2 pooling and dropout, then
the same MLP head on the flattened features. `model_from_spec` builds either from a `ModelSpec`.
"""

from __future__ import annotations

import torch
from torch import nn

from .specs import ACTIVATION_NAMES, ModelSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,  # negative slope 0.01, PyTorch's default
}
LEAKY_SLOPE = 0.01
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES  # the torch-free names in specs.py name these modules


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _linear_stack(spec: ModelSpec) -> nn.Sequential:
    """The Linear / [BatchNorm1d /] activation / dropout layers of `spec.widths` (an MLP, or a CNN's head)."""
    widths = spec.widths
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < spec.num_layers - 1:  # hidden layer
            if spec.batch_norm:
                layers.append(nn.BatchNorm1d(fan_out))
            layers.append(ACTIVATIONS[spec.activation]())
            if spec.dropout > 0:
                layers.append(nn.Dropout(spec.dropout))
    return nn.Sequential(*layers)


class NeuralNetwork(nn.Module):
    """The seeds' MLP. Layers live in `self.layers` as Linear / activation / dropout modules."""

    def __init__(self, num_layers: int = 3, layer_size: int = 128, activation: str = "relu",
                 dropout: float = 0.0, in_features: int = 784, num_classes: int = 10,
                 mean: float = 0.0, std: float = 1.0, height: int = 0, width: int = 0, batch_norm: bool = False):
        super().__init__()
        self.spec = ModelSpec(num_layers=num_layers, layer_size=layer_size, activation=activation, dropout=dropout,
                              batch_norm=batch_norm, in_features=in_features, num_classes=num_classes, mean=mean, std=std,
                              height=height, width=width)
        self.normalize = Normalize(mean, std)
        self.flatten = nn.Flatten()
        self.layers = _linear_stack(self.spec)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "NeuralNetwork":
        if spec.family != "mlp":
            raise ValueError(f"NeuralNetwork is the mlp family, not {spec.family}")
        keep = ("num_layers", "layer_size", "activation", "dropout", "batch_norm", "in_features", "num_classes",
                "mean", "std", "height", "width")
        return cls(**{k: v for k, v in spec.to_dict().items() if k in keep})

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def batch_norms(self) -> list[nn.BatchNorm1d]:
        return [m for m in self.layers if isinstance(m, nn.BatchNorm1d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.flatten(self.normalize(x)))


class ConvNet(nn.Module):
    """The seeds' CNN: `features` (conv, activation, pool, dropout per block), then `layers`."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.family != "cnn":
            raise ValueError(f"ConvNet is the cnn family, not {spec.family}")
        self.spec = spec
        self.height, self.width = spec.image_hw  # plain ints: TorchScript cannot read the spec
        self.normalize = Normalize(spec.mean, spec.std)
        Pool = nn.MaxPool2d if spec.pooling == "max" else nn.AvgPool2d
        blocks: list[nn.Module] = []
        for c_in, c_out in zip([1] + spec.conv_channels[:-1], spec.conv_channels):
            blocks += [nn.Conv2d(c_in, c_out, spec.kernel_size, padding=spec.kernel_size // 2),
                       ACTIVATIONS[spec.activation](), Pool(2)]
            if spec.conv_dropout > 0:
                blocks.append(nn.Dropout(spec.conv_dropout))
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.layers = _linear_stack(spec)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "ConvNet":
        return cls(spec)

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x).reshape(-1, 1, self.height, self.width)  # [N, H*W] works too
        return self.layers(self.flatten(self.features(x)))


def model_from_spec(spec: ModelSpec) -> nn.Module:
    """A fresh network of either family (what a checkpoint's spec rebuilds)."""
    return ConvNet(spec) if spec.family == "cnn" else NeuralNetwork.from_spec(spec)


def build_model(params: dict, in_features: int = 784, num_classes: int = 10,
                mean: float = 0.0, std: float = 1.0, image_shape: tuple[int, int] | None = None) -> nn.Module:
    """Build the network a trial's sampled params describe (extra keys such as lr are ignored)."""
    height, width = image_shape or (0, 0)
    spec = ModelSpec.from_dict({**params, "in_features": in_features, "num_classes": num_classes,
                                "mean": mean, "std": std, "height": height, "width": width})
    return model_from_spec(spec)

"""Networks built from a plain dict of sampled parameters.

`NeuralNetwork` is the seeds' flexible MLP: `num_layers` counts the Linear layers *including* the
output layer (num_layers=2 is one hidden layer), every hidden layer has `layer_size` units and the
same activation, optionally followed by dropout. Input normalization is a buffer inside the model,
so a saved model takes raw float images in [0, 1] shaped [N, 1, H, W] and returns logits.
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


class NeuralNetwork(nn.Module):
    """The seeds' MLP. Layers live in `self.layers` as Linear / activation / dropout modules."""

    def __init__(self, num_layers: int = 3, layer_size: int = 128, activation: str = "relu",
                 dropout: float = 0.0, in_features: int = 784, num_classes: int = 10,
                 mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.spec = ModelSpec(num_layers, layer_size, activation, dropout, in_features, num_classes, mean, std)
        self.normalize = Normalize(mean, std)
        self.flatten = nn.Flatten()
        widths = self.spec.widths
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < num_layers - 1:  # hidden layer
                layers.append(ACTIVATIONS[activation]())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "NeuralNetwork":
        return cls(**spec.to_dict())

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.flatten(self.normalize(x)))


def build_model(params: dict, in_features: int = 784, num_classes: int = 10,
                mean: float = 0.0, std: float = 1.0) -> NeuralNetwork:
    """Build the network a trial's sampled params describe (extra keys such as lr are ignored)."""
    spec = ModelSpec.from_dict({**params, "in_features": in_features, "num_classes": num_classes,
                                "mean": mean, "std": std})
    return NeuralNetwork.from_spec(spec)

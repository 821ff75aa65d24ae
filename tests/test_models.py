import pytest
import torch
from torch import nn

from hpsearch.models import ACTIVATIONS, ModelSpec, NeuralNetwork, build_model


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("num_layers", [1, 2, 5])
def test_shapes_and_layer_counts(activation, num_layers):
    model = NeuralNetwork(num_layers=num_layers, layer_size=64, activation=activation, dropout=0.2)
    linears = model.linears()
    assert len(linears) == num_layers  # counts Linear layers including the output, as the seeds did
    assert linears[0].in_features == 784 and linears[-1].out_features == 10
    assert all(l.out_features == 64 for l in linears[:-1])
    acts = [m for m in model.layers if isinstance(m, ACTIVATIONS[activation])]
    drops = [m for m in model.layers if isinstance(m, nn.Dropout)]
    assert len(acts) == len(drops) == num_layers - 1
    out = model.eval()(torch.rand(7, 1, 28, 28))
    assert out.shape == (7, 10)
    assert sum(p.numel() for p in model.parameters()) == model.spec.param_count()


def test_normalization_lives_inside_the_model():
    model = build_model({"num_layers": 2, "layer_size": 8, "activation": "relu", "lr": 0.1},
                        mean=0.3, std=0.4).eval()
    x = torch.rand(3, 1, 28, 28)
    manual = model.layers(((x - 0.3) / 0.4).flatten(1))
    assert torch.allclose(model(x), manual)
    assert set(model.state_dict()) >= {"normalize.mean", "normalize.std"}


def test_spec_round_trips_and_validates():
    spec = ModelSpec(num_layers=3, layer_size=32, activation="tanh", dropout=0.1, mean=0.2, std=0.3)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        ModelSpec(activation="gelu")
    with pytest.raises(ValueError):
        ModelSpec(num_layers=0)
    with pytest.raises(ValueError, match="true or false"):
        ModelSpec(batch_norm=1)  # 1 == True, but a checkpoint's spec must hold a bool
    with pytest.raises(ValueError, match="mlp family only"):
        ModelSpec(family="cnn", batch_norm=True)


def test_batch_norm_sits_between_each_hidden_linear_and_its_activation():
    model = NeuralNetwork(num_layers=3, layer_size=16, activation="relu", dropout=0.1, batch_norm=True)
    kinds = [type(m).__name__ for m in model.layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert model.spec.param_count() == sum(p.numel() for p in model.parameters())

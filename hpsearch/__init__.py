"""hpsearch: hyperparameter search for MNIST-style image classifiers.

    hpsearch run --trials 100        # an Optuna study into studies/hpsearch.db
    hpsearch studies                 # what the storage holds

Every command is also a function here, for notebooks.
"""

from .data import Dataset, load_dataset
from .errors import DataError, HPSearchError, SpaceError
from .models import ModelSpec, NeuralNetwork, build_model
from .train import EpochResult, PopulationTrainer, TrainConfig, TrainResult, train_one

__version__ = "0.1.0"

__all__ = [
    "DataError", "Dataset", "EpochResult", "HPSearchError", "ModelSpec", "NeuralNetwork",
    "PopulationTrainer", "SpaceError", "TrainConfig", "TrainResult", "build_model",
    "load_dataset", "train_one",
]

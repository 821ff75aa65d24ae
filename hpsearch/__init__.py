"""hpsearch: hyperparameter search for MNIST-style image classifiers.

    hpsearch run --trials 100        # an Optuna study into studies/hpsearch.db
    hpsearch report                  # charts, tables and the retrained best model in results/<study>/
    hpsearch studies                 # what the storage holds

Every command is also a function here, for notebooks:

    >>> from hpsearch import load_dataset, TrainConfig, train_one   # doctest: +SKIP
    >>> data = load_dataset("fashion-mnist", subset=10000)          # doctest: +SKIP
    >>> result = train_one(TrainConfig(num_layers=3, layer_size=256, epochs=5), data)  # doctest: +SKIP
    >>> result.final.val_acc                                         # doctest: +SKIP
"""

from importlib import import_module

from .errors import DataError, HPSearchError, SpaceError

__version__ = "0.1.0"

# Public names -> defining module. Imported on first use, so `hpsearch --help` and
# `import hpsearch.errors` don't pay for importing torch.
_LAZY = {
    "Dataset": "data", "load_dataset": "data",
    "ModelSpec": "models", "NeuralNetwork": "models", "build_model": "models",
    "load_model": "checkpoint",
    "EpochResult": "train", "PopulationTrainer": "train", "TrainConfig": "train", "TrainResult": "train",
    "train_one": "train",
    "RunSettings": "config", "run_study": "search", "run_workers": "workers",
    "write_report": "report",
}

__all__ = ["DataError", "HPSearchError", "SpaceError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hpsearch' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)

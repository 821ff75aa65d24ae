"""hpsearch: hyperparameter search for MNIST-style image classifiers.

    hpsearch run --trials 100        # an Optuna study into studies/hpsearch.db
    hpsearch report                  # charts, tables and the best model, tested, in results/<study>/
    hpsearch export --format onnx    # results/<study>/best_model.onnx
    hpsearch studies                 # what the storage holds

Every command is also a function here, with the same options and defaults (docs/api.md):

    >>> import hpsearch                                                          # doctest: +SKIP
    >>> study = hpsearch.run(study="demo", trials=20, epochs=5, subset=10000)   # an optuna.Study, with a progress bar
    >>> result = hpsearch.report("demo")         # results/demo/index.html; result.test_accuracy
    >>> hpsearch.export(format="onnx")           # results/demo/best_model.onnx
    >>> hpsearch.predict(["shirt.png"])          # [Prediction(image='shirt.png', label='Shirt', ...)]
    >>> model = hpsearch.load_model(result.checkpoint)   # an eval-mode torch module: images -> logits

The search space and trainer as the objective of your own Optuna study (your sampler, callbacks):

    >>> objective = hpsearch.Objective(subset=2000, epochs=3, space="mlp")      # doctest: +SKIP
    >>> study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    >>> study.optimize(objective, n_trials=3)

Lower down: `load_dataset`, `TrainConfig`, `train_one`, `PopulationTrainer`, `load_space`.
Mistakes raise `HPSearchError` (`DataError`, `SpaceError`) with a one-line message.
"""

import sys
import types
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
    "Space": "space", "load_space": "space",
    "run": "api", "predict": "api", "load_study": "api", "Report": "api",
    "Objective": "study",
}
# `hpsearch.report` and `hpsearch.export` name both a submodule and an API function. Python sets
# a package's attribute to its submodule whenever that is imported, which would hide a function
# of the same name, so these two submodules themselves are made callable (`_Package`).
_CALLABLE_MODULES = ("report", "export")

__all__ = ["DataError", "HPSearchError", "SpaceError", *_LAZY, *_CALLABLE_MODULES]


class _CallableModule(types.ModuleType):
    """hpsearch.report / hpsearch.export: the module, and called, `hpsearch.api.report` / `.export`."""

    def __call__(self, *args, **kwargs):
        return getattr(import_module(".api", __name__), self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _CALLABLE_MODULES and type(value) is types.ModuleType:  # the import system's setattr
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _CALLABLE_MODULES:
        return import_module(f".{name}", __name__)  # made callable as it is set here
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hpsearch' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)

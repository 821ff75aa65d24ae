"""How loud Optuna is: its INFO log and experimental-feature warnings only with --debug."""

from __future__ import annotations

import warnings

import optuna


def configure_optuna_logging(debug: bool) -> None:
    optuna.logging.set_verbosity(optuna.logging.INFO if debug else optuna.logging.WARNING)
    if not debug:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", module="optuna")

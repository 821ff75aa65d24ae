"""Optuna's own charts of a study (`optuna.visualization`) and its parameter importances.

Each function takes a `StudyView` and returns a plotly figure; the report decides which to draw,
titles them, and turns a chart that cannot be drawn yet into a note. hpsearch's own figures
(learning curves, accuracy against size) are drawn from `TrialRow`s in `hpsearch.report.figures`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import optuna

from ..errors import HPSearchError
from .view import StudyView

IMPORTANCE_EVALUATORS = ("ped-anova", "fanova")
TARGET = "validation accuracy"


def importance_evaluator(name: str) -> tuple[object, str]:
    """The importance evaluator for `--importance NAME` and a line describing it."""
    if name == "ped-anova":
        return optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA (Optuna's default evaluator)"
    if name == "fanova":
        try:
            import sklearn  # noqa: F401 - Optuna's fANOVA fits a scikit-learn random forest
        except ImportError:
            raise HPSearchError("--importance fanova needs scikit-learn: pip install scikit-learn "
                                "(or use the default --importance ped-anova)") from None
        return optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA (random-forest functional ANOVA, seed 0)"
    raise HPSearchError(f"unknown importance evaluator {name!r}; choose one of {', '.join(IMPORTANCE_EVALUATORS)}")


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna logs chart caveats ("unique value length is less than 2") as warnings; a report
    states what it drew, so keep stderr for errors."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def param_importances(view: StudyView, evaluator) -> dict:
    """Parameter name -> importance, most important first (needs 2 complete trials)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.importance.get_param_importances(view.study, evaluator=evaluator)


def importance_figure(view: StudyView, evaluator, label: str):
    import optuna.visualization as vis

    return vis.plot_param_importances(view.study, evaluator=evaluator).update_layout(
        title=f"Hyperparameter importance for {TARGET}: {label}")


def history_figure(view: StudyView):
    import optuna.visualization as vis

    return vis.plot_optimization_history(view.study, target_name=TARGET)


def parallel_figure(view: StudyView, params: list[str]):
    import optuna.visualization as vis

    return vis.plot_parallel_coordinate(view.study, params=params or None, target_name=TARGET)


def slice_figure(view: StudyView, params: list[str]):
    import optuna.visualization as vis

    return vis.plot_slice(view.study, params=params or None, target_name=TARGET)


def contour_figure(view: StudyView, params: list[str]):
    """Contours of two or three parameters (three make a 3x3 grid, hence the height)."""
    import optuna.visualization as vis

    return vis.plot_contour(view.study, params=params, target_name=TARGET).update_layout(
        height=500 if len(params) == 2 else 850)


def timeline_figure(view: StudyView):
    import optuna.visualization as vis

    return vis.plot_timeline(view.study)

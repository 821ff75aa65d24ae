"""`write_report`: read the study, draw its charts, test the best model, write the folder.

Each step is one short function, called in the order the files appear; a chart that cannot be
drawn yet becomes a note on the page instead of an error.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Callable

from ..checkpoint import atomic_write
from ..config import DEFAULT_STORAGE, check_study_name, results_name
from ..errors import HPSearchError, first_line
from ..study import charts as optuna_charts
from ..study.charts import IMPORTANCE_EVALUATORS
from ..study.view import CHECKPOINT_NAME, Log, StudyView, open_view, study_summary, trials_frame
from .figures import Chart, best_so_far_figure, learning_curves_figure, size_figure
from .html import PLOTLY_JS, render_index
from .retrain import Retrained, kept_best, retrain_best, reuse_best, tested_best_start

# PED-ANOVA (the default evaluator) contrasts the top 10% of trials with the rest: below 20
# complete trials that top is one trial, so the importances are rough.
IMPORTANCE_ROUGH_BELOW = 20


def _add_chart(charts: list[Chart], log: Log, name: str, title: str, make: Callable, note: str = "") -> None:
    """Draw one chart; one that cannot be drawn yet becomes a note (and a log line), not an error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig = make()
        if fig is None:
            charts.append(Chart(name, title, None, "not available: no trial has the data for it yet"))
            return
        if not fig.layout.title.text:
            fig.update_layout(title=title)
        charts.append(Chart(name, title, fig, note))
    except HPSearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - a chart that cannot be drawn yet must not sink the report
        log(f"chart {name}: not available ({first_line(exc)})")
        charts.append(Chart(name, title, None, f"not available: {first_line(exc)}"))


def _importances(view: StudyView, evaluator, complete: int, log: Log) -> dict:
    if complete < 2:
        return {}
    try:
        return optuna_charts.param_importances(view, evaluator)
    except HPSearchError:
        raise
    except Exception as exc:  # noqa: BLE001
        log(f"parameter importance: not available ({first_line(exc)})")
        return {}


def importance_note(label: str, complete: int) -> str:
    """Which evaluator, from how many complete trials, and whether that is too few to trust."""
    note = f"Evaluator: {label}, from {complete} complete trials"
    if complete < IMPORTANCE_ROUGH_BELOW:
        note += f"; fewer than {IMPORTANCE_ROUGH_BELOW}: treat as rough"
    return note + "."


def _importance_chart(charts: list[Chart], log: Log, view: StudyView, evaluator, label: str,
                      importances: dict, complete: int) -> None:
    if importances:
        _add_chart(charts, log, "importance", f"Hyperparameter importance: {label}",
                   lambda: optuna_charts.importance_figure(view, evaluator, label), importance_note(label, complete))
    else:
        charts.append(Chart("importance", "Hyperparameter importance", None,
                            f"not available: needs at least 2 complete trials with varied parameters "
                            f"({complete} complete)"))


def study_charts(view: StudyView, importance: str, log: Log) -> tuple[list[Chart], dict, str]:
    """The study's charts, the parameter importances and the evaluator's description."""
    charts: list[Chart] = []
    evaluator, label = optuna_charts.importance_evaluator(importance)
    complete = sum(t.state == "COMPLETE" for t in view.trials)
    importances = _importances(view, evaluator, complete, log)
    params = list(importances) or list(view.best.params)
    top = params[:4]
    add = functools.partial(_add_chart, charts, log)  # the charts below, in page order
    _importance_chart(charts, log, view, evaluator, label, importances, complete)
    add("history", "Optimization history", lambda: optuna_charts.history_figure(view))
    add("best_over_time", "Best validation accuracy against wall time", lambda: best_so_far_figure(view.trials))
    add("intermediate", "Learning curves of all trials", lambda: learning_curves_figure(view.trials, view.best),
        "Validation accuracy after every epoch, as reported to the pruner. Pruned trials are dotted and end in an x.")
    add("parallel", "Parallel coordinates", lambda: optuna_charts.parallel_figure(view, params))
    add("slice", f"Slice plot of the top parameters ({', '.join(top)})", lambda: optuna_charts.slice_figure(view, top))
    if len(params) >= 2:
        add("contour", f"Contour of the top parameters ({', '.join(params[:3])})",
            lambda: optuna_charts.contour_figure(view, params[:3]))
    else:
        charts.append(Chart("contour", "Contour of the top parameters", None, "not available: needs two parameters"))
    add("size", "Validation accuracy against parameter count", lambda: size_figure(view.trials, view.best))
    add("timeline", "Timeline of trials", lambda: optuna_charts.timeline_figure(view))
    return charts, importances, label


def _out_dir(out: str | os.PathLike | None, study: str) -> Path:
    if out is None:
        results_name(study)  # the name may come from the database, not from the user
    out_dir = Path(out) if out is not None else Path("results") / study
    try:
        (out_dir / "charts").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HPSearchError(f"cannot write the report to {out_dir}: {exc.strerror or exc}") from None
    return out_dir


def _add_start_test(summary: dict, retrained: Retrained, start: dict | None) -> None:
    """The best start's test accuracy beside the best trial's: in best.json and summary.json."""
    retrained.best_json.pop("best_start", None)
    if start is None or summary.get("best_start") is None:
        return
    retrained.best_json["best_start"] = start
    summary["best_start"].update(test_accuracy=start["test_accuracy"],
                                 test_lead=retrained.evaluation.accuracy - start["test_accuracy"])


def _write_best(out_dir: Path, retrained: Retrained) -> list[str]:
    text = json.dumps(retrained.best_json, indent=2, default=str)
    atomic_write(out_dir / "best.json", lambda tmp: Path(tmp).write_text(text + "\n"))
    return ["best.json", CHECKPOINT_NAME]


def _write_plotly_js(out_dir: Path) -> None:
    """plotly.min.js, once, in the report folder: index.html and charts/*.html load it from there
    (offline, no CDN); rewritten only when plotly changed."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    path = out_dir / PLOTLY_JS
    if not path.is_file() or path.stat().st_size != len(js.encode()) or path.read_text(encoding="utf-8") != js:
        atomic_write(path, lambda tmp: Path(tmp).write_text(js, encoding="utf-8"))
    (out_dir / "charts" / PLOTLY_JS).unlink(missing_ok=True)  # the second copy older reports wrote


def _write_charts(out_dir: Path, charts: list[Chart]) -> list[str]:
    """charts/<name>.html for every drawn chart, loading ../plotly.min.js."""
    _write_plotly_js(out_dir)
    files = []
    for chart in charts:
        if chart.fig is not None:
            atomic_write(out_dir / "charts" / f"{chart.name}.html",
                         lambda tmp, fig=chart.fig: fig.write_html(tmp, include_plotlyjs=f"../{PLOTLY_JS}", full_html=True,
                                                                   config={"displaylogo": False}))
            files.append(f"charts/{chart.name}.html")
    return files


def _best_model(view: StudyView, out_dir: Path, retrain: bool | None, device: str, data_dir: str | None,
                artifact: bool, log: Log) -> Retrained:
    """Unless `retrain` is True, the earlier report's model when it is still the best trial's, else
    the trial's own model as the search kept it; else (or when `retrain`) the trial retrained."""
    if retrain is None:
        found = reuse_best(view, out_dir, data_dir, log, artifact) or kept_best(view, out_dir, data_dir, log, artifact)
        if found is not None:
            return found
    return retrain_best(view, out_dir, device, data_dir, log, artifact=artifact)


def write_report(study: str | None = None, storage: str = DEFAULT_STORAGE, out: str | os.PathLike | None = None,
                 retrain: bool | None = None, importance: str = "ped-anova", device: str = "cpu",
                 data_dir: str | None = None, artifact: bool = True, log: Log | None = None) -> Path:
    """Write the report folder of a study; returns the path of its index.html.

    `retrain`: None retrains the best trial only when neither the folder's best_model.pt (same
    trial, configuration, data and trainer) nor the model the search kept is its model; True
    always retrains; False neither retrains nor tests (no best.json, no model)."""
    log = log or (lambda msg: None)
    if study is not None:
        check_study_name(study)
    if importance not in IMPORTANCE_EVALUATORS:
        raise HPSearchError(f"unknown importance evaluator {importance!r}; choose one of {', '.join(IMPORTANCE_EVALUATORS)}")
    view = open_view(storage, study)
    out_dir = _out_dir(out, view.name)
    summary = study_summary(view)
    with optuna_charts.quiet_optuna():
        charts, importances, evaluator_label = study_charts(view, importance, log)
    complete = sum(t.state == "COMPLETE" for t in view.trials)
    summary["importance"] = {"evaluator": evaluator_label, "values": importances, "complete_trials": complete,
                             "note": importance_note(evaluator_label, complete)}

    frame = trials_frame(view)
    atomic_write(out_dir / "trials.csv", lambda tmp: frame.to_csv(tmp, index=False))
    files = ["trials.csv"]
    retrained = None
    if retrain is not False:
        retrained = _best_model(view, out_dir, retrain, device, data_dir, artifact, log)
        charts += retrained.charts
        _add_start_test(summary, retrained, tested_best_start(view, retrained, device, data_dir, log,
                                                                  use_kept=retrain is None))
        files += _write_best(out_dir, retrained)
    files += _write_charts(out_dir, charts)
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic_write(out_dir / "summary.json", lambda tmp: Path(tmp).write_text(text))
    files.insert(0, "summary.json")
    page = render_index(summary, charts, importances, evaluator_label,
                        retrained.best_json if retrained is not None else None, files)
    index = out_dir / "index.html"
    atomic_write(index, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return index

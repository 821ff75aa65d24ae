"""`hpsearch report`: a study's storage in, one self-contained results folder out.

Everything comes from the storage (study and trial user attributes, intermediate values), so a
report can be made while the study is still running, or on a study another machine ran. With
`retrain` (the default) the best configuration is retrained from scratch on the study's training
split (same data, same seed: the same model the trial trained, bit for bit on the CPU), then
evaluated once on the test split, and saved as a checkpoint.

    results/<study>/
      index.html          one page, opens offline (plotly.js embedded once), links everything
      charts/*.html       each chart alone (+ charts/plotly.min.js beside them, for offline use)
      trials.csv          one row per trial: params, state, value, duration, user attrs
      best.json           best params, validation and test accuracy, per-class P/R/F1, versions
      best_model.pt       the retrained model: state_dict + spec (torch.load(weights_only=True))

The checkpoint is also stored as an Optuna artifact of the study (a file-system artifact store
beside the database), so optuna-dashboard lists it. Finished trials cannot take new attributes
in Optuna, so the artifact belongs to the study and is named `best_model_trial<N>.pt`.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from optuna.trial import FrozenTrial, TrialState

from . import __version__
from .checkpoint import atomic_write, save_checkpoint
from .data import Dataset, load_dataset
from .errors import HPSearchError
from .search import DEFAULT_STORAGE, DEFAULT_STUDY, check_study_name, open_storage, redact, storage_file
from .train import EpochResult, TrainConfig, default_device, train_one

IMPORTANCE_EVALUATORS = ("ped-anova", "fanova")
CHECKPOINT_NAME = "best_model.pt"
ARTIFACT_PREFIX = "best_model_trial"
GALLERY_SIZE = 36
SAMPLES_PER_CLASS = 10

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# Storage and study (read only)


def open_existing_storage(url: str) -> optuna.storages.BaseStorage:
    """Open a storage that must already exist (never creates a database file)."""
    if url in ("sqlite://", "sqlite:///", "sqlite:///:memory:"):
        raise HPSearchError(f"storage {url!r} is an in-memory database: there is nothing in it to read")
    file = storage_file(url)
    if file is not None and not file.is_file():
        raise HPSearchError(f"no study storage at {file}; run `hpsearch run` first or pass --storage URL")
    return open_storage(url)


def artifact_dir(url: str) -> Path:
    """Where the study's artifacts live: beside a SQLite/journal file, else studies/artifacts."""
    file = storage_file(url)
    return (file.parent if file is not None else Path("studies")) / "artifacts"


def resolve_study(storage: optuna.storages.BaseStorage, url: str, name: str | None) -> optuna.Study:
    """Load a study by name; with no name, the storage's only study (or the default one)."""
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # noqa: BLE001 - a file that is not an Optuna database, a dead server...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HPSearchError(f"cannot read studies from {redact(url)}: {msg[:200]}") from None
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif DEFAULT_STUDY in names:
            name = DEFAULT_STUDY
        elif not names:
            raise HPSearchError(f"{redact(url)} holds no studies; run `hpsearch run` first")
        else:
            raise HPSearchError(f"{redact(url)} holds {len(names)} studies ({', '.join(sorted(names)[:10])}); "
                                f"pick one with --study NAME")
    if name not in names:
        have = f"it holds: {', '.join(sorted(names)[:10])}" if names else "it holds no studies"
        raise HPSearchError(f"no study {name!r} in {redact(url)} ({have})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.load_study(study_name=name, storage=storage)
    if len(study.directions) != 1:
        raise HPSearchError(f"study {name!r} has {len(study.directions)} objectives; hpsearch reports "
                            f"single-objective studies only")
    return study


def best_complete_trial(study: optuna.Study) -> FrozenTrial:
    """The best COMPLETE trial, or a one-line error saying why there is none."""
    trials = study.get_trials(deepcopy=False)
    name = study.study_name
    if not trials:
        raise HPSearchError(f"study {name!r} has no trials yet; run `hpsearch run --study {name}` first")
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                and math.isfinite(t.value)]
    if not complete:
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        if counts["fail"] == len(trials):
            raise HPSearchError(f"study {name!r} has only failed trials ({len(trials)}); nothing to report. "
                                f"Check the run's errors, then run the study again")
        states = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        raise HPSearchError(f"study {name!r} has no complete trial yet ({states}); "
                            f"wait for one to finish or run more trials")
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return (max if maximize else min)(complete, key=lambda t: t.value)


def find_study_checkpoint(study_name: str | None, storage_url: str = DEFAULT_STORAGE,
                          results_dir: str | os.PathLike = "results") -> Path:
    """The checkpoint of the study's current best trial: its Optuna artifact, else the report's file."""
    storage = open_existing_storage(storage_url)
    study = resolve_study(storage, storage_url, study_name)
    best = best_complete_trial(study)
    wanted = f"{ARTIFACT_PREFIX}{best.number}.pt"
    store_dir = artifact_dir(storage_url)
    for meta in reversed(optuna.artifacts.get_all_artifact_meta(study, storage=storage)):
        if meta.filename == wanted and (store_dir / meta.artifact_id).is_file():
            return store_dir / meta.artifact_id
    local = Path(results_dir) / study.study_name / CHECKPOINT_NAME
    if local.is_file():
        try:
            trial = torch.load(local, map_location="cpu", weights_only=True).get("meta", {}).get("trial")
        except Exception:  # noqa: BLE001 - load_model will say what is wrong with it
            trial = None
        if trial == best.number:
            return local
    raise HPSearchError(f"study {study.study_name!r} has no checkpoint of its best trial ({best.number}) yet; "
                        f"run `hpsearch report --study {study.study_name}` first")


# ----------------------------------------------------------------------------------------------
# Tables


def _seconds(t: FrozenTrial) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def study_summary(study: optuna.Study, url: str, best: FrozenTrial) -> dict:
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    durations = [d for d in map(_seconds, trials) if d is not None]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    attrs = study.user_attrs
    return {
        "study": study.study_name,
        "storage": redact(url),
        "dataset": attrs.get("dataset"),
        "dataset_info": attrs.get("dataset_info"),
        "subset": attrs.get("subset"),
        "val_fraction": attrs.get("val_fraction"),
        "epochs": attrs.get("epochs"),
        "seed": attrs.get("seed"),
        "created": attrs.get("created"),
        "direction": study.direction.name.lower(),
        "trials": len(trials),
        "states": {k.lower(): v for k, v in states.items()},
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "trial_seconds_total": sum(durations),
        "wall_seconds": (max(ends) - min(starts)).total_seconds() if starts and ends else None,
        "devices": sorted({str(t.user_attrs["device"]) for t in trials if "device" in t.user_attrs}),
    }


def _cell(value):
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return value


def trials_frame(study: optuna.Study):
    """One row per trial: number, state, value, times, params_*, user_attrs_* (nested as JSON)."""
    df = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "datetime_complete",
                                       "duration", "params", "user_attrs"))
    if "duration" in df:
        df.insert(df.columns.get_loc("duration") + 1, "duration_s", df["duration"].dt.total_seconds())
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(_cell)
    return df


# ----------------------------------------------------------------------------------------------
# Study charts


@dataclass
class Chart:
    name: str  # file stem
    title: str
    fig: object | None  # plotly Figure
    note: str = ""


def _evaluator(name: str):
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


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _param_summary(params: dict) -> str:
    return "<br>".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _intermediate_figure(study: optuna.Study, best: FrozenTrial):
    import plotly.graph_objects as go

    fig = go.Figure()
    styles = {
        TrialState.COMPLETE: dict(color="rgba(31,119,180,0.55)", dash="solid", name="complete"),
        TrialState.PRUNED: dict(color="rgba(255,127,14,0.75)", dash="dot", name="pruned (cut short)"),
        TrialState.RUNNING: dict(color="rgba(44,160,44,0.8)", dash="dash", name="running"),
        TrialState.FAIL: dict(color="rgba(127,127,127,0.6)", dash="dot", name="failed"),
    }
    shown: set = set()
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values or t.state not in styles:
            continue
        steps = sorted(t.intermediate_values)
        values = [t.intermediate_values[s] for s in steps]
        is_best = t.number == best.number
        st = styles[t.state]
        group = "best" if is_best else st["name"]
        fig.add_trace(go.Scatter(
            x=steps, y=values, mode="lines+markers",
            line=dict(color="crimson" if is_best else st["color"], width=3 if is_best else 1.5,
                      dash="solid" if is_best else st["dash"]),
            marker=dict(size=[4] * (len(steps) - 1) + [10 if t.state == TrialState.PRUNED else 5],
                        symbol=["circle"] * (len(steps) - 1) + ["x" if t.state == TrialState.PRUNED else "circle"]),
            name=f"best (trial {t.number})" if is_best else st["name"], legendgroup=group,
            showlegend=group not in shown,
            hovertemplate=f"trial {t.number} ({t.state.name.lower()})<br>epoch %{{x}}<br>val acc %{{y:.4f}}"
                          f"<br>{_param_summary(t.params)}<extra></extra>",
        ))
        shown.add(group)
    fig.update_layout(title="Learning curves of all trials (validation accuracy per epoch; "
                            "pruned trials end in an x)",
                      xaxis_title="epoch", yaxis_title="validation accuracy", hovermode="closest")
    last = max((max(t.intermediate_values) for t in study.get_trials(deepcopy=False) if t.intermediate_values),
               default=1)
    fig.update_xaxes(tick0=1, dtick=_epoch_tick(last))
    return fig


def _epoch_tick(epochs: int) -> int:
    return max(1, math.ceil(epochs / 12))


def _params_vs_size_figure(study: optuna.Study, best: FrozenTrial):
    import plotly.graph_objects as go

    fig = go.Figure()
    any_points = False
    for state, color, symbol in ((TrialState.COMPLETE, "#1f77b4", "circle"), (TrialState.PRUNED, "#ff7f0e", "x")):
        rows = [(t.user_attrs["param_count"], t.value if state == TrialState.COMPLETE else t.user_attrs.get("best_val_acc"), t)
                for t in study.get_trials(deepcopy=False, states=(state,)) if "param_count" in t.user_attrs]
        rows = [r for r in rows if r[1] is not None]
        if not rows:
            continue
        any_points = True
        fig.add_trace(go.Scatter(
            x=[r[0] for r in rows], y=[r[1] for r in rows], mode="markers",
            marker=dict(color=color, symbol=symbol, size=9, opacity=0.8),
            name="complete: final val acc" if state == TrialState.COMPLETE else "pruned: best val acc before the cut",
            text=[f"trial {r[2].number}<br>{_param_summary(r[2].params)}" for r in rows],
            hovertemplate="%{text}<br>parameters %{x:,}<br>val acc %{y:.4f}<extra></extra>",
        ))
    if "param_count" in best.user_attrs:
        fig.add_trace(go.Scatter(x=[best.user_attrs["param_count"]], y=[best.value], mode="markers",
                                 marker=dict(color="crimson", size=16, symbol="star"),
                                 name=f"best (trial {best.number})", hoverinfo="skip"))
    if not any_points:
        return None
    fig.update_layout(title="Validation accuracy against model size", xaxis_title="trainable parameters (log)",
                      yaxis_title="validation accuracy", xaxis_type="log")
    return fig


def study_charts(study: optuna.Study, best: FrozenTrial, importance: str, log: Log) -> tuple[list[Chart], dict, str]:
    """The study's charts, the parameter importances and the evaluator's description."""
    import optuna.visualization as vis

    charts: list[Chart] = []
    evaluator, evaluator_label = _evaluator(importance)

    def add(name: str, title: str, make, note: str = "") -> None:
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
            log(f"chart {name}: not available ({_short_error(exc)})")
            charts.append(Chart(name, title, None, f"not available: {_short_error(exc)}"))

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    importances: dict = {}
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except HPSearchError:
            raise
        except Exception as exc:  # noqa: BLE001
            log(f"parameter importance: not available ({_short_error(exc)})")
    params = list(importances) or list(best.params)
    top = params[:4]

    if importances:
        add("importance", f"Hyperparameter importance: {evaluator_label}",
            lambda: vis.plot_param_importances(study, evaluator=evaluator).update_layout(
                title=f"Hyperparameter importance for validation accuracy: {evaluator_label}"),
            f"Evaluator: {evaluator_label}, over {len(complete)} complete trials.")
    else:
        charts.append(Chart("importance", "Hyperparameter importance", None,
                            f"not available: needs at least 2 complete trials with varied parameters "
                            f"({len(complete)} complete)"))
    add("history", "Optimization history", lambda: vis.plot_optimization_history(study, target_name="validation accuracy"))
    add("intermediate", "Learning curves of all trials", lambda: _intermediate_figure(study, best),
        "Validation accuracy after every epoch, as reported to the pruner. Pruned trials are dotted and end in an x.")
    add("parallel", "Parallel coordinates", lambda: vis.plot_parallel_coordinate(study, params=params or None,
                                                                                  target_name="validation accuracy"))
    add("slice", f"Slice plot of the top parameters ({', '.join(top)})",
        lambda: vis.plot_slice(study, params=top or None, target_name="validation accuracy"))
    if len(params) >= 2:
        add("contour", f"Contour of the top parameters ({', '.join(params[:3])})",
            lambda: vis.plot_contour(study, params=params[:3], target_name="validation accuracy").update_layout(
                height=500 if len(params) == 2 else 850))
    else:
        charts.append(Chart("contour", "Contour of the top parameters", None, "not available: needs two parameters"))
    add("size", "Validation accuracy against parameter count", lambda: _params_vs_size_figure(study, best))
    add("timeline", "Timeline of trials", lambda: vis.plot_timeline(study))
    return charts, importances, evaluator_label


# ----------------------------------------------------------------------------------------------
# Retraining the best trial and its one test evaluation


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    correct: int
    total: int
    predictions: torch.Tensor  # [N] int64, CPU
    probabilities: torch.Tensor  # [N] probability of the predicted class, CPU
    confusion: np.ndarray  # [C, C] rows true, columns predicted
    per_class: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classes, image_shape=(28, 28)) -> Evaluation:
    """Accuracy, loss, confusion matrix and per-class precision/recall/F1 on (x, y), in one batch."""
    model.eval()
    device = next(model.parameters()).device
    logits = model(x.to(device).reshape(len(x), 1, *image_shape)).float()
    y = y.to(device)
    loss = float(F.cross_entropy(logits, y))
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    correct = int((pred == y).sum())
    C = len(classes)
    cm = torch.bincount(y * C + pred, minlength=C * C).reshape(C, C).cpu().numpy()
    per_class = []
    for c in range(C):
        tp = int(cm[c, c])
        predicted = int(cm[:, c].sum())
        support = int(cm[c, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": classes[c], "precision": precision, "recall": recall, "f1": f1,
                          "support": support})
    return Evaluation(correct / len(y), loss, correct, len(y), pred.cpu(), conf.cpu(), cm, per_class)


def retrain_config(study: optuna.Study, best: FrozenTrial) -> TrainConfig:
    config = best.user_attrs.get("config")
    if not isinstance(config, dict):  # a study made by other code: rebuild from params + study budget
        config = {**best.params, "epochs": study.user_attrs.get("epochs", 20),
                  "seed": best.user_attrs.get("seed", study.user_attrs.get("seed", 0))}
    try:
        return TrainConfig.from_params(config)
    except (TypeError, ValueError) as exc:
        raise HPSearchError(f"trial {best.number}'s configuration cannot be retrained: {_short_error(exc)}") from None


def retrain_data(study: optuna.Study, device: torch.device, data_dir: str | None, log: Log) -> Dataset:
    attrs = study.user_attrs
    if "dataset" not in attrs:
        raise HPSearchError(f"study {study.study_name!r} does not say which dataset it used (no 'dataset' "
                            f"user attribute); report it with --no-retrain")
    if data_dir is None:
        data_dir = attrs.get("data_dir")
        if data_dir and not Path(data_dir).is_dir() and attrs["dataset"] != "idx":
            log(f"the study's data directory {data_dir} is not here; looking for {attrs['dataset']} in the usual places")
            data_dir = None
    return load_dataset(attrs["dataset"], data_dir, device, attrs.get("val_fraction", 0.1),
                        attrs.get("subset"), attrs.get("seed", 0))


def versions() -> dict:
    import pandas
    import plotly

    return {"hpsearch": __version__, "torch": torch.__version__, "optuna": optuna.__version__,
            "numpy": np.__version__, "pandas": pandas.__version__, "plotly": plotly.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _images(x: torch.Tensor, image_shape) -> np.ndarray:
    return (x.detach().float().cpu().reshape(-1, *image_shape).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def confusion_figure(cm: np.ndarray, classes):
    import plotly.express as px

    fig = px.imshow(cm, x=list(classes), y=list(classes), text_auto=True, color_continuous_scale="Blues",
                    labels=dict(x="predicted class", y="true class", color="test images"), aspect="auto")
    fig.update_layout(title="Confusion matrix on the test split (rows: true class, columns: predicted)",
                      height=650)
    fig.update_xaxes(side="bottom", tickangle=-30)
    return fig


def gallery_figure(images: np.ndarray, titles: list[str], title: str, columns: int = 6):
    import plotly.express as px

    if len(images) == 0:
        return None
    fig = px.imshow(images, facet_col=0, facet_col_wrap=columns, binary_string=True,
                    facet_row_spacing=0.06, facet_col_spacing=0.02)
    for ann in fig.layout.annotations:
        index = int(str(ann.text).split("=")[-1])
        ann.text = titles[index]
        ann.font = dict(size=11)
    rows = math.ceil(len(images) / columns)
    fig.update_xaxes(showticklabels=False).update_yaxes(showticklabels=False)
    fig.update_layout(title=title, height=140 + 170 * rows, margin=dict(t=90, l=10, r=10, b=10))
    return fig


def misclassified_figure(data: Dataset, ev: Evaluation):
    wrong = torch.nonzero(ev.predictions != data.test_y.cpu()).flatten()
    if len(wrong) == 0:
        return None
    # the most confident mistakes first: the most informative ones
    order = wrong[torch.argsort(ev.probabilities[wrong], descending=True, stable=True)][:GALLERY_SIZE]
    y = data.test_y.cpu()
    titles = [f"#{int(i)} true: {data.classes[int(y[i])]}<br>pred: {data.classes[int(ev.predictions[i])]} "
              f"({float(ev.probabilities[i]):.2f})" for i in order]
    return gallery_figure(_images(data.test_x.cpu()[order], data.image_shape), titles,
                          f"Misclassified test images, most confident first ({len(wrong)} of {ev.total} wrong)")


def samples_figure(data: Dataset):
    """A mosaic: one row per class, SAMPLES_PER_CLASS training images each."""
    import plotly.express as px

    H, W = data.image_shape
    pad = 2
    C = data.num_classes
    mosaic = np.full((C * (H + pad) + pad, SAMPLES_PER_CLASS * (W + pad) + pad), 128, dtype=np.uint8)
    y = data.train_y.cpu()
    for c in range(C):
        idx = torch.nonzero(y == c).flatten()[:SAMPLES_PER_CLASS]
        for j, img in enumerate(_images(data.train_x.cpu()[idx], data.image_shape)):
            r0, c0 = pad + c * (H + pad), pad + j * (W + pad)
            mosaic[r0:r0 + H, c0:c0 + W] = img
    fig = px.imshow(mosaic, binary_string=True)
    fig.update_yaxes(tickmode="array", tickvals=[pad + c * (H + pad) + H / 2 for c in range(C)],
                     ticktext=list(data.classes))
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=f"Training images of {data.name}, {SAMPLES_PER_CLASS} per class",
                      height=max(400, 62 * C + 120), width=None)
    return fig


def curves_figure(history: list[EpochResult], title: str):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    epochs = [r.epoch for r in history]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    for col, metric in ((1, "loss"), (2, "acc")):
        for split, color in (("train", "#1f77b4"), ("val", "#ff7f0e")):
            fig.add_trace(go.Scatter(x=epochs, y=[getattr(r, f"{split}_{metric}") for r in history],
                                     mode="lines+markers", line=dict(color=color),
                                     name="training" if split == "train" else "validation",
                                     legendgroup=split, showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text="epoch", tick0=1, dtick=_epoch_tick(len(epochs)), row=1, col=col)
    fig.update_layout(title=title, height=450)
    return fig


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def store_artifact(study: optuna.Study, storage, url: str, checkpoint: Path, trial_number: int, log: Log) -> dict | None:
    """Upload the checkpoint as a study artifact (once per identical file); returns its description."""
    store_dir = artifact_dir(url)
    filename = f"{ARTIFACT_PREFIX}{trial_number}.pt"
    digest = _sha256(checkpoint)
    try:
        for meta in optuna.artifacts.get_all_artifact_meta(study, storage=storage):
            existing = store_dir / meta.artifact_id
            if meta.filename == filename and existing.is_file() and _sha256(existing) == digest:
                return {"artifact_id": meta.artifact_id, "filename": filename, "store": str(store_dir),
                        "reused": True}
        store_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            named = Path(tmp) / filename
            named.write_bytes(checkpoint.read_bytes())
            artifact_id = optuna.artifacts.upload_artifact(
                artifact_store=optuna.artifacts.FileSystemArtifactStore(store_dir), file_path=str(named),
                study_or_trial=study, storage=storage, mimetype="application/octet-stream")
        return {"artifact_id": artifact_id, "filename": filename, "store": str(store_dir), "reused": False}
    except Exception as exc:  # noqa: BLE001 - a read-only storage still gets its report
        log(f"could not store the checkpoint as an Optuna artifact in {store_dir}: {_short_error(exc)}")
        return None


@dataclass
class Retrained:
    config: TrainConfig
    data: Dataset
    history: list[EpochResult]
    evaluation: Evaluation
    seconds: float
    checkpoint: Path
    best_json: dict
    charts: list[Chart]


def retrain_best(study: optuna.Study, storage, url: str, best: FrozenTrial, out: Path, device: str,
                 data_dir: str | None, log: Log, artifact: bool = True) -> Retrained:
    try:
        dev = default_device(device)
    except ValueError as exc:
        raise HPSearchError(str(exc)) from None
    config = retrain_config(study, best)
    data = retrain_data(study, dev, data_dir, log)
    log(f"retraining trial {best.number} ({config.num_layers}x{config.layer_size} {config.activation}, "
        f"{config.optimizer}) for {config.epochs} epochs on {len(data.train_y)} training images ({dev})")
    start = time.perf_counter()
    result = train_one(config, data)
    seconds = time.perf_counter() - start
    # Evaluated on the CPU in float32 whatever the training device: exactly what `load_model` gives.
    model = result.model.cpu().float().eval()
    ev = evaluate(model, data.test_x.cpu(), data.test_y.cpu(), data.classes, data.image_shape)
    final = result.final
    trained_on = "train"
    note = ("trained from scratch on the study's training split (validation held out, as in the study), "
            f"for the trial's budget of {config.epochs} epochs; evaluated once on the test split")
    if result.stopped:
        note += f"; training stopped early: {result.stopped}"
    meta = {
        "study": study.study_name, "storage": redact(url), "trial": best.number, "params": best.params,
        "config": config.to_dict(), "dataset": data.name, "dataset_info": data.describe(),
        "subset": study.user_attrs.get("subset"), "val_fraction": study.user_attrs.get("val_fraction"),
        "split_seed": study.user_attrs.get("seed"), "trained_on": trained_on,
        "validation_accuracy": final.val_acc, "test_accuracy": ev.accuracy, "versions": versions(),
    }  # no timestamp: the same model gives the same bytes, so a report run twice stores one artifact
    if best.value is not None and abs(final.val_acc - best.value) >= 1e-6:
        log(f"note: the retrained model's validation accuracy {final.val_acc:.4f} differs from the trial's "
            f"{best.value:.4f} (the trial ran on another device, in a population, or with other code); "
            f"the test accuracy reported is the retrained model's")
    ckpt_path = save_checkpoint(out / CHECKPOINT_NAME, model, classes=data.classes,
                                image_shape=data.image_shape, meta=meta)
    art = store_artifact(study, storage, url, ckpt_path, best.number, log) if artifact else None
    macro = {k: float(np.mean([c[k] for c in ev.per_class])) for k in ("precision", "recall", "f1")}
    best_json = {
        "study": study.study_name,
        "storage": redact(url),
        "trial": best.number,
        "params": best.params,
        "config": config.to_dict(),
        "seed": config.seed,
        "trained_on": trained_on,
        "training": note,
        "epochs": len(result.history),
        "device": str(dev),
        "retrain_seconds": seconds,
        "study_validation_accuracy": best.value,
        "validation_accuracy": final.val_acc,
        "validation_loss": final.val_loss,
        "train_accuracy": final.train_acc,
        "train_loss": final.train_loss,
        "reproduced_study_value": best.value is not None and abs(final.val_acc - best.value) < 1e-6,
        "test_accuracy": ev.accuracy,
        "test_loss": ev.loss,
        "test_correct": ev.correct,
        "test_total": ev.total,
        "per_class": ev.per_class,
        "macro_avg": macro,
        "confusion_matrix": ev.confusion.tolist(),
        "classes": list(data.classes),
        "dataset_info": data.describe(),
        "param_count": model.spec.param_count(),
        "checkpoint": CHECKPOINT_NAME,
        "checkpoint_sha256": _sha256(ckpt_path),
        "artifact": art,
        "versions": versions(),
        "study_versions": best.user_attrs.get("versions"),
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    charts = [
        Chart("confusion_matrix", "Confusion matrix (test split)", confusion_figure(ev.confusion, data.classes)),
        Chart("misclassified", "Misclassified test images", misclassified_figure(data, ev)),
        Chart("retrain_curves", "Retrained model: loss and accuracy",
              curves_figure(result.history, f"Retrained best trial {best.number}: loss and accuracy per epoch")),
        Chart("samples", "Sample of the data", samples_figure(data)),
    ]
    if charts[1].fig is None:
        charts[1].note = "no misclassified test images"
    return Retrained(config, data, result.history, ev, seconds, ckpt_path, best_json, charts)


# ----------------------------------------------------------------------------------------------
# HTML


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1300px;padding:0 24px 60px;color:#222}
h1{margin:24px 0 4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 10px;text-align:left;font-size:14px}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#555;font-size:14px}.muted{color:#888}nav a{margin-right:14px}
.chart{border:1px solid #eee;margin:10px 0;padding:4px}code{background:#f4f4f4;padding:1px 4px}
"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return json.dumps(v)
    return "-" if v is None else str(v)


def _table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _chart_html(chart: Chart) -> str:
    head = f'<section id="{chart.name}"><h2>{html.escape(chart.title)}</h2>'
    if chart.fig is None:
        return head + f'<p class="note muted">{html.escape(chart.note or "not available")}</p></section>'
    div = chart.fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{chart.name}",
                            config={"displaylogo": False, "responsive": True})
    note = f'<p class="note">{html.escape(chart.note)}</p>' if chart.note else ""
    return (head + note + f'<div class="chart">{div}</div>'
            f'<p class="note"><a href="charts/{chart.name}.html">open this chart alone</a></p></section>')


def render_index(summary: dict, charts: list[Chart], importances: dict, evaluator_label: str,
                 retrained: Retrained | None, files: list[str]) -> str:
    from plotly.offline import get_plotlyjs

    s = summary
    states = ", ".join(f"{n} {k}" for k, n in s["states"].items() if n)
    info = s.get("dataset_info") or {}
    rows = [
        ("study", s["study"]), ("storage", s["storage"]),
        ("dataset", f"{s['dataset']} ({info.get('train', '?')} train / {info.get('validation', '?')} validation / "
                    f"{info.get('test', '?')} test images; subset {s['subset']})"),
        ("epoch budget per trial", s["epochs"]), ("seed", s["seed"]), ("created", s["created"]),
        ("trials", f"{s['trials']} ({states})"),
        ("best validation accuracy", f"{s['best_value']:.4f} (trial {s['best_trial']})"),
        ("total compute time", f"{_duration(s['trial_seconds_total'])} summed over trials; "
                               f"{_duration(s['wall_seconds'])} wall clock from first start to last finish"),
        ("devices", ", ".join(s["devices"]) or "-"),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>hpsearch report: {html.escape(s['study'])}</title><style>{_CSS}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>hpsearch report: {html.escape(s['study'])}</h1>",
        f"<p class='note'>Generated {html.escape(datetime.now().astimezone().isoformat(timespec='seconds'))} "
        f"by hpsearch {__version__} from the study's storage; objective: validation accuracy "
        f"({html.escape(s['direction'])}).</p>",
        "<nav>" + "".join(f"<a href='#{c.name}'>{html.escape(c.name.replace('_', ' '))}</a>" for c in charts) + "</nav>",
        "<h2 id='summary'>Summary</h2>", _table(rows),
        "<h2>Best parameters</h2>", _table(list(s["best_params"].items())),
    ]
    if importances:
        parts += [f"<p class='note'>Importance ({html.escape(evaluator_label)}): " +
                  ", ".join(f"{html.escape(k)} {v:.3f}" for k, v in importances.items()) + "</p>"]
    if retrained is not None:
        b = retrained.best_json
        parts += [
            "<h2 id='test'>Best model on the test split</h2>",
            f"<p class='note'>{html.escape(b['training'])}.</p>",
            _table([("test accuracy", f"{b['test_accuracy']:.4f} ({b['test_correct']} / {b['test_total']})"),
                    ("test loss", b["test_loss"]),
                    ("validation accuracy (retrained)", b["validation_accuracy"]),
                    ("validation accuracy (in the study)", b["study_validation_accuracy"]),
                    ("macro F1", b["macro_avg"]["f1"]), ("parameters", f"{b['param_count']:,}"),
                    ("seed", b["seed"]), ("retraining time", _duration(b["retrain_seconds"]))]),
            "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>" +
            "".join(f"<tr><td>{html.escape(c['class'])}</td><td class='num'>{c['precision']:.4f}</td>"
                    f"<td class='num'>{c['recall']:.4f}</td><td class='num'>{c['f1']:.4f}</td>"
                    f"<td class='num'>{c['support']}</td></tr>" for c in b["per_class"]) + "</table>",
        ]
    parts += ["<h2>Files</h2><ul>" + "".join(f"<li><a href='{html.escape(f)}'>{html.escape(f)}</a></li>" for f in files)
              + "</ul>"]
    if retrained is not None:
        parts += ["<p class='note'>Load the model with <code>from hpsearch import load_model; "
                  "model = load_model('best_model.pt')</code>: float images in [0, 1], [N, 1, 28, 28] in, "
                  "logits out.</p>"]
    parts += [_chart_html(c) for c in charts]
    parts += ["</body></html>"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------


def write_report(study: str | None = None, storage: str = DEFAULT_STORAGE, out: str | os.PathLike | None = None,
                 retrain: bool = True, importance: str = "ped-anova", device: str = "cpu",
                 data_dir: str | None = None, artifact: bool = True, log: Log | None = None) -> Path:
    """Write the report folder of a study; returns the path of its index.html."""
    log = log or (lambda msg: None)
    if study is not None:
        check_study_name(study)
    if importance not in IMPORTANCE_EVALUATORS:
        raise HPSearchError(f"unknown importance evaluator {importance!r}; choose one of {', '.join(IMPORTANCE_EVALUATORS)}")
    st = open_existing_storage(storage)
    study_obj = resolve_study(st, storage, study)
    best = best_complete_trial(study_obj)
    out_dir = Path(out) if out is not None else Path("results") / study_obj.study_name
    try:
        (out_dir / "charts").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HPSearchError(f"cannot write the report to {out_dir}: {exc.strerror or exc}") from None

    summary = study_summary(study_obj, storage, best)
    # Optuna logs chart caveats ("unique value length is less than 2") as warnings; the report
    # states what it drew, so keep stderr for errors.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        charts, importances, evaluator_label = study_charts(study_obj, best, importance, log)
    finally:
        optuna.logging.set_verbosity(verbosity)
    summary["importance"] = {"evaluator": evaluator_label, "values": importances}

    trials_frame(study_obj).to_csv(out_dir / "trials.csv", index=False)
    files = ["trials.csv"]
    retrained = None
    if retrain:
        retrained = retrain_best(study_obj, st, storage, best, out_dir, device, data_dir, log, artifact)
        charts += retrained.charts
        text = json.dumps(retrained.best_json, indent=2, default=str)
        atomic_write(out_dir / "best.json", lambda tmp: Path(tmp).write_text(text + "\n"))
        files += ["best.json", CHECKPOINT_NAME]
    for chart in charts:
        if chart.fig is not None:
            chart.fig.write_html(out_dir / "charts" / f"{chart.name}.html", include_plotlyjs="directory",
                                 full_html=True, config={"displaylogo": False})
            files.append(f"charts/{chart.name}.html")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    files.insert(0, "summary.json")
    page = render_index(summary, charts, importances, evaluator_label, retrained, files)
    index = out_dir / "index.html"
    atomic_write(index, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return index

"""hpsearch's own figures: learning curves and accuracy against size from `TrialRow`s, and the
retrained model's confusion matrix, mistakes, training curves and a sample of its data.

Plain plotly (imported when a figure is drawn); Optuna's charts are in `hpsearch.study.charts`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..study.schema import TrialAttr, TrialRow

if TYPE_CHECKING:
    from ..data import Dataset
    from ..train import EpochResult
    from .retrain import Evaluation

GALLERY_SIZE = 36
SAMPLES_PER_CLASS = 10
FIT_MIN_COMPLETE = 4  # fewer complete trials cannot tell the good ones from the diverged

# Line styles of the learning curves by trial state (TrialRow.state).
_CURVE_STYLES = {
    "COMPLETE": dict(color="rgba(31,119,180,0.55)", dash="solid", name="complete"),
    "PRUNED": dict(color="rgba(255,127,14,0.75)", dash="dot", name="pruned (cut short)"),
    "RUNNING": dict(color="rgba(44,160,44,0.8)", dash="dash", name="running"),
    "FAIL": dict(color="rgba(127,127,127,0.6)", dash="dot", name="failed"),
}


@dataclass
class Chart:
    """One chart of the report: charts/<name>.html and a section of index.html."""

    name: str  # file stem
    title: str
    fig: object | None  # plotly Figure; None: not drawn, `note` says why
    note: str = ""


def _param_summary(params: dict) -> str:
    return "<br>".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _epoch_tick(epochs: int) -> int:
    return max(1, math.ceil(epochs / 12))


def fitted_accuracy_range(per_trial: list[list[float]], complete: list[float]) -> list[float] | None:
    """A y-range for accuracies that fits the good trials, so that a few diverged ones (at chance,
    0.1) do not squash the rest into a line at the top: from the lowest value of the better half of
    the complete trials, less a margin, to just above the highest value shown. None (plotly's
    autoscale) when that would not at least double the room of the good trials, or with too few
    complete trials to tell."""
    shown = [v for vs in per_trial for v in vs if v is not None and math.isfinite(v)]
    values = sorted((v for v in complete if v is not None and math.isfinite(v)), reverse=True)
    if len(values) < FIT_MIN_COMPLETE or not shown:
        return None
    anchor = values[(len(values) - 1) // 2]  # the lowest of the better half: robust to half diverging
    top = max(shown)
    low = anchor - max(1.5 * (top - anchor), 0.02)
    if top - min(shown) <= 2 * (top - low):  # nothing far below: early epochs and weaker trials stay in view
        return None
    return [low, top + max(0.05 * (top - low), 0.005)]


def _fit_accuracy_axis(fig, per_trial: list[list[float]], trials: list[TrialRow]) -> None:
    """Fit the y-axis to the good trials; say so, and how many trials it leaves out."""
    complete = [t.value for t in trials if t.state == "COMPLETE" and t.value is not None]
    fitted = fitted_accuracy_range(per_trial, complete)
    if fitted is None:
        return
    fig.update_yaxes(range=fitted)
    below = sum(1 for vs in per_trial if vs and max(vs) < fitted[0])
    hidden = f"; {below} trial{'s' * (below != 1)} entirely below it" if below else ""
    fig.add_annotation(text=f"y-axis fitted to the better trials, from {fitted[0]:.3f}{hidden}: double-click to see all",
                       xref="paper", yref="paper", x=1, y=0, xanchor="right", yanchor="bottom", showarrow=False,
                       font=dict(size=11, color="#666"))


def _curve_trace(t: TrialRow, best: TrialRow, shown: set):
    import plotly.graph_objects as go

    steps = sorted(t.intermediate)
    is_best = t.number == best.number
    pruned = t.state == "PRUNED"
    style = _CURVE_STYLES[t.state]
    group = "best" if is_best else style["name"]
    trace = go.Scatter(
        x=steps, y=[t.intermediate[s] for s in steps], mode="lines+markers",
        line=dict(color="crimson" if is_best else style["color"], width=3 if is_best else 1.5,
                  dash="solid" if is_best else style["dash"]),
        marker=dict(size=[4] * (len(steps) - 1) + [10 if pruned else 5],
                    symbol=["circle"] * (len(steps) - 1) + ["x" if pruned else "circle"]),
        name=f"best (trial {t.number})" if is_best else style["name"], legendgroup=group,
        showlegend=group not in shown,
        hovertemplate=f"trial {t.number} ({t.state.lower()})<br>epoch %{{x}}<br>val acc %{{y:.4f}}"
                      f"<br>{_param_summary(t.params)}<extra></extra>",
    )
    shown.add(group)
    return trace


def learning_curves_figure(trials: list[TrialRow], best: TrialRow):
    """Validation accuracy per epoch of every trial, as reported to the pruner; the best in red.
    The y-axis fits the good trials (`fitted_accuracy_range`)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    shown: set = set()
    drawn = [t for t in trials if t.intermediate and t.state in _CURVE_STYLES]
    for t in drawn:
        fig.add_trace(_curve_trace(t, best, shown))
    _fit_accuracy_axis(fig, [list(t.intermediate.values()) for t in drawn], trials)
    fig.update_layout(title="Learning curves of all trials (validation accuracy per epoch; "
                            "pruned trials end in an x)",
                      xaxis_title="epoch", yaxis_title="validation accuracy", hovermode="closest")
    last = max((max(t.intermediate) for t in trials if t.intermediate), default=1)
    fig.update_xaxes(tick0=1, dtick=_epoch_tick(last))
    return fig


def _size_points(trials: list[TrialRow], state: str) -> list[tuple[int, float, TrialRow]]:
    """(parameters, accuracy, trial): a complete trial's value, a pruned one's best before the cut."""
    rows = [(t.param_count, t.value if state == "COMPLETE" else t.best_val_acc, t)
            for t in trials if t.state == state and TrialAttr.PARAM_COUNT in t.attrs]
    return [r for r in rows if r[1] is not None]


def size_figure(trials: list[TrialRow], best: TrialRow):
    """Validation accuracy against trainable parameters (log axis); None when no trial has both.
    The y-axis fits the good trials (`fitted_accuracy_range`)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    points: list[list[float]] = []
    for state, color, symbol in (("COMPLETE", "#1f77b4", "circle"), ("PRUNED", "#ff7f0e", "x")):
        rows = _size_points(trials, state)
        if not rows:
            continue
        points += [[r[1]] for r in rows]
        fig.add_trace(go.Scatter(
            x=[r[0] for r in rows], y=[r[1] for r in rows], mode="markers",
            marker=dict(color=color, symbol=symbol, size=9, opacity=0.8),
            name="complete: final val acc" if state == "COMPLETE" else "pruned: best val acc before the cut",
            text=[f"trial {r[2].number}<br>{_param_summary(r[2].params)}" for r in rows],
            hovertemplate="%{text}<br>parameters %{x:,}<br>val acc %{y:.4f}<extra></extra>",
        ))
    if TrialAttr.PARAM_COUNT in best.attrs:
        fig.add_trace(go.Scatter(x=[best.param_count], y=[best.value], mode="markers",
                                 marker=dict(color="crimson", size=16, symbol="star"),
                                 name=f"best (trial {best.number})", hoverinfo="skip"))
    if not points:
        return None
    fig.update_layout(title="Validation accuracy against model size", xaxis_title="trainable parameters (log)",
                      yaxis_title="validation accuracy", xaxis_type="log")
    _fit_accuracy_axis(fig, points, trials)
    return fig


def best_so_far_points(trials: list[TrialRow]) -> list[tuple[float, float, TrialRow]]:
    """(minutes since the study's first trial started, best value so far, the trial that set it),
    one point per complete trial that raised the best."""
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    done = sorted((t for t in trials if t.state == "COMPLETE" and t.value is not None and t.datetime_complete),
                  key=lambda t: t.datetime_complete)
    points, best = [], None
    for t in done:
        if best is None or t.value > best:
            best = t.value
            points.append(((t.datetime_complete - min(starts)).total_seconds() / 60, best, t))
    return points


def best_so_far_figure(trials: list[TrialRow]):
    """Best validation accuracy against wall time, the starting configurations marked: the gain the
    search made over them, per minute of compute. None before the first complete trial."""
    import plotly.graph_objects as go

    points = best_so_far_points(trials)
    if not points:
        return None
    text = [f"trial {t.number}" + (f" ([[start]] {t.start})" if t.start is not None else "") for _, _, t in points]
    fig = go.Figure(go.Scatter(
        x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", line_shape="hv",
        marker=dict(size=10, symbol=["diamond" if t.start is not None else "circle" for _, _, t in points],
                    color=["#2ca02c" if t.start is not None else "#1f77b4" for _, _, t in points]),
        text=text, hovertemplate="%{text}<br>%{x:.1f} min<br>best val acc %{y:.4f}<extra></extra>",
        name="best so far"))
    fig.update_layout(title="Best validation accuracy against wall time (diamonds: starting configurations)",
                      xaxis_title="minutes since the first trial started", yaxis_title="best validation accuracy")
    return fig


# ----------------------------------------------------------------------------------------------
# The retrained model


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


def retrain_charts(data: Dataset, ev: Evaluation, history: list[EpochResult], trial_number: int) -> list[Chart]:
    """The retrained model's charts, in the order the report shows them."""
    charts = [
        Chart("confusion_matrix", "Confusion matrix (test split)", confusion_figure(ev.confusion, data.classes)),
        Chart("misclassified", "Misclassified test images", misclassified_figure(data, ev)),
        Chart("retrain_curves", "Best model: loss and accuracy",
              curves_figure(history, f"Best trial {trial_number}: loss and accuracy per epoch")),
        Chart("samples", "Sample of the data", samples_figure(data)),
    ]
    if charts[1].fig is None:
        charts[1].note = "no misclassified test images"
    return charts

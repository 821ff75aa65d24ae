"""The study's best model: found or retrained, evaluated once on the test split, saved.

Three ways to the best trial's model, cheapest first (`report/build.py` tries them in order):
`reuse_best`, the checkpoint an earlier report left in the folder, while the best trial, its
configuration, the data and the trainer are unchanged; `kept_best`, the trial's own weights as
the search kept them (`kept.py`); `retrain_best`, the configuration retrained from scratch on the
study's training split (same data, same seed: the same model the trial trained, bit for bit on the
CPU). The model is evaluated once on the test split on the CPU in float32 (exactly what
`load_model` gives) and saved as `best_model.pt`; `best.json` describes it.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..checkpoint import atomic_write, load_checkpoint, save_checkpoint
from ..config import resolve_device
from ..data import Dataset, load_dataset
from ..errors import HPSearchError, as_user_error, first_line
from ..specs import TrainConfig, describe_shape
from ..study import OPTUNA_VERSION
from ..study.schema import StudyAttr, TrialAttr, TrialRow
from ..study.storage import redact
from ..study.view import CHECKPOINT_NAME, Log, StudyView, best_start_trial, file_sha256, store_artifact
from ..train import TRAINER_VERSION, EpochResult, TrainResult, train_one
from .figures import Chart, retrain_charts
from .kept import HISTORY_FIELDS, KeptModel, kept_model

# Bump when retraining, its evaluation or what best.json records changes: a report reuses an
# earlier checkpoint only when it was made the same way (see `retrain_key`).
RETRAIN_VERSION = 1

# What best.json must hold for a report to reuse its checkpoint without retraining.
_SAVED_KEYS = ("test_accuracy", "test_loss", "test_correct", "test_total", "per_class", "macro_avg",
               "confusion_matrix", "classes", "dataset_info", "history", "param_count", "retrain_seconds",
               "checkpoint_sha256")


@dataclass
class Evaluation:
    """A model's one pass over a labelled split."""

    accuracy: float
    loss: float
    correct: int
    total: int
    predictions: torch.Tensor  # [N] int64, CPU
    probabilities: torch.Tensor  # [N] probability of the predicted class, CPU
    confusion: np.ndarray  # [C, C] rows true, columns predicted
    per_class: list[dict] = field(default_factory=list)


def _per_class(cm: np.ndarray, classes) -> list[dict]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows true)."""
    per_class = []
    for c in range(len(classes)):
        tp = int(cm[c, c])
        predicted = int(cm[:, c].sum())
        support = int(cm[c, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"class": classes[c], "precision": precision, "recall": recall, "f1": f1,
                          "support": support})
    return per_class


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
    return Evaluation(correct / len(y), loss, correct, len(y), pred.cpu(), conf.cpu(), cm, _per_class(cm, classes))


def retrain_config(view: StudyView) -> TrainConfig:
    """The best trial's configuration; for a study made by other code, its params + the study's budget."""
    best = view.best
    config = best.config
    if config is None:
        config = {**best.params, "epochs": view.attrs.get(StudyAttr.EPOCHS, 20),
                  "seed": best.attrs.get(TrialAttr.SEED, view.attrs.get(StudyAttr.SEED, 0))}
    try:
        return TrainConfig.from_params(config)
    except (TypeError, ValueError) as exc:
        raise HPSearchError(f"trial {best.number}'s configuration cannot be retrained: {first_line(exc)}") from None


def retrain_data(view: StudyView, device: torch.device, data_dir: str | None, log: Log) -> Dataset:
    """The study's dataset and splits; its data directory if it is here, else the usual places."""
    attrs = view.attrs
    if StudyAttr.DATASET not in attrs:
        raise HPSearchError(f"study {view.name!r} does not say which dataset it used (no {StudyAttr.DATASET!r} "
                            f"user attribute); report it with --no-retrain")
    dataset = attrs[StudyAttr.DATASET]
    if data_dir is None:
        data_dir = attrs.get(StudyAttr.DATA_DIR)
        if data_dir and not Path(data_dir).is_dir() and dataset != "idx":
            log(f"the study's data directory {data_dir} is not here; looking for {dataset} in the usual places")
            data_dir = None
    return load_dataset(dataset, data_dir, device, attrs.get(StudyAttr.VAL_FRACTION, 0.1),
                        attrs.get(StudyAttr.SUBSET), attrs.get(StudyAttr.SEED, 0))


def retrain_key(view: StudyView, config: TrainConfig) -> dict:
    """Everything that decides the retrained model (JSON values): a saved checkpoint is reused only
    when its best.json records the same key."""
    attrs = view.attrs
    key = {"study": view.name, "trial": view.best.number, "config": config.to_dict(),
           "dataset": attrs.get(StudyAttr.DATASET), "subset": attrs.get(StudyAttr.SUBSET),
           "val_fraction": attrs.get(StudyAttr.VAL_FRACTION), "split_seed": attrs.get(StudyAttr.SEED),
           "hpsearch": __version__, "trainer": TRAINER_VERSION, "retrain": RETRAIN_VERSION}
    return json.loads(json.dumps(key, default=str))  # tuples as lists: compares equal to best.json's


def versions() -> dict:
    import pandas
    import plotly

    return {"hpsearch": __version__, "trainer": TRAINER_VERSION, "retrain": RETRAIN_VERSION,
            "torch": torch.__version__, "optuna": OPTUNA_VERSION,
            "numpy": np.__version__, "pandas": pandas.__version__, "plotly": plotly.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


@dataclass
class Retrained:
    """The retrained best model: how it trained, its test evaluation, its files and charts."""

    config: TrainConfig
    data: Dataset
    history: list[EpochResult]
    evaluation: Evaluation
    seconds: float
    checkpoint: Path
    best_json: dict
    charts: list[Chart]


@dataclass
class _Run:
    """One retraining: what `best.json` and the checkpoint's metadata are made of."""

    view: StudyView
    config: TrainConfig
    data: Dataset
    device: str
    result: TrainResult
    model: torch.nn.Module  # on the CPU, float32, eval mode
    evaluation: Evaluation
    seconds: float
    note: str = ""
    trained_by: str = "report"  # "search": the trial's own weights, kept when it finished


def _train(view: StudyView, device: str, data_dir: str | None, log: Log) -> _Run:
    with as_user_error():
        dev = resolve_device(device)
    config = retrain_config(view)
    data = retrain_data(view, dev, data_dir, log)
    log(f"retraining trial {view.best.number} ({describe_shape(config.to_dict())}, "
        f"{config.optimizer}) for {config.epochs} epochs on {len(data.train_y)} training images ({dev})")
    result, model, ev, seconds = train_and_test(config, data)
    note = ("trained from scratch on the study's training split (validation held out, as in the study), "
            f"for the trial's budget of {config.epochs} epochs; evaluated once on the test split")
    if result.stopped:
        note += f"; training stopped early: {result.stopped}"
    return _Run(view, config, data, str(dev), result, model, ev, seconds, note)


def train_and_test(config: TrainConfig, data: Dataset) -> tuple[TrainResult, torch.nn.Module, Evaluation, float]:
    """Train `config` on `data`'s training split and test it once: (result, model, evaluation,
    seconds). The model is evaluated on the CPU in float32 whatever the training device: exactly
    what `load_model` gives."""
    start = time.perf_counter()
    result = train_one(config, data)
    seconds = time.perf_counter() - start
    model = result.model.cpu().float().eval()
    return result, model, evaluate(model, data.test_x.cpu(), data.test_y.cpu(), data.classes, data.image_shape), seconds


def _checkpoint_meta(run: _Run) -> dict:
    view, final = run.view, run.result.final
    # no timestamp: the same model gives the same bytes, so a report run twice stores one artifact
    return {
        "study": view.name, "storage": redact(view.url), "trial": view.best.number, "params": view.best.params,
        "config": run.config.to_dict(), "dataset": run.data.name, "dataset_info": run.data.describe(),
        "subset": view.attrs.get(StudyAttr.SUBSET), "val_fraction": view.attrs.get(StudyAttr.VAL_FRACTION),
        "split_seed": view.attrs.get(StudyAttr.SEED), "trained_on": "train", "trained_by": "report",
        "validation_accuracy": final.val_acc, "test_accuracy": run.evaluation.accuracy, "versions": versions(),
    }


def _reproduced(run: _Run) -> bool:
    study_value = run.view.best.value
    return study_value is not None and abs(run.result.final.val_acc - study_value) < 1e-6


def _best_json(run: _Run, checkpoint: Path, artifact: dict | None) -> dict:
    view, best, final, ev = run.view, run.view.best, run.result.final, run.evaluation
    macro = {k: float(np.mean([c[k] for c in ev.per_class])) for k in ("precision", "recall", "f1")}
    return {
        "study": view.name, "storage": redact(view.url), "trial": best.number, "params": best.params,
        "config": run.config.to_dict(), "seed": run.config.seed, "trained_on": "train", "training": run.note,
        "trained_by": run.trained_by, "epochs": len(run.result.history), "device": run.device,
        "retrain_seconds": run.seconds,
        "study_validation_accuracy": best.value,
        "validation_accuracy": final.val_acc, "validation_loss": final.val_loss,
        "train_accuracy": final.train_acc, "train_loss": final.train_loss,
        "reproduced_study_value": _reproduced(run),
        "test_accuracy": ev.accuracy, "test_loss": ev.loss, "test_correct": ev.correct, "test_total": ev.total,
        "per_class": ev.per_class, "macro_avg": macro, "confusion_matrix": ev.confusion.tolist(),
        "classes": list(run.data.classes), "dataset_info": run.data.describe(),
        "param_count": run.model.spec.param_count(),
        "checkpoint": CHECKPOINT_NAME, "checkpoint_sha256": file_sha256(checkpoint), "artifact": artifact,
        "versions": versions(), "study_versions": best.versions,
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        # what a later report needs to reuse this checkpoint: the key, and the curves it charts
        "retrain_key": retrain_key(view, run.config),
        "history": [{f: getattr(r, f) for f in HISTORY_FIELDS} for r in run.result.history],
    }


def retrain_best(view: StudyView, out: Path, device: str, data_dir: str | None, log: Log,
                 artifact: bool = True) -> Retrained:
    """Retrain, test and save the best trial's model in `out` (and as a study artifact)."""
    run = _train(view, device, data_dir, log)
    best = view.best
    meta = _checkpoint_meta(run)
    if best.value is not None and abs(run.result.final.val_acc - best.value) >= 1e-6:
        log(f"note: the retrained model's validation accuracy {run.result.final.val_acc:.4f} differs from the "
            f"trial's {best.value:.4f} (the trial ran on another device, in a population, or with other code); "
            f"the test accuracy reported is the retrained model's")
    ckpt_path = save_checkpoint(out / CHECKPOINT_NAME, run.model, classes=run.data.classes,
                                image_shape=run.data.image_shape, meta=meta)
    art = store_artifact(view.study, view.storage, view.url, ckpt_path, best.number, log) if artifact else None
    best_json = _best_json(run, ckpt_path, art)
    charts = retrain_charts(run.data, run.evaluation, run.result.history, best.number)
    return Retrained(run.config, run.data, run.result.history, run.evaluation, run.seconds, ckpt_path,
                     best_json, charts)


def _saved_best(view: StudyView, out: Path, key: dict) -> tuple[dict | None, str]:
    """best.json of an earlier report in `out` when its checkpoint is of `key` and the file it
    describes; else (None, why not: empty when there is no earlier model)."""
    path, ckpt = out / "best.json", out / CHECKPOINT_NAME
    if not path.is_file() or not ckpt.is_file():
        return None, ""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"cannot read best.json ({first_line(exc)})"
    old = saved.get("retrain_key") if isinstance(saved, dict) else None
    if not isinstance(old, dict):
        return None, "best.json does not say how it was trained (an older report)"
    if old.get("trial") != key["trial"]:
        return None, f"it is of trial {old.get('trial')}, the best trial is now {key['trial']}"
    changed = [k for k in key if old.get(k) != key[k]]
    if changed:
        return None, f"its {', '.join(changed)} changed"
    missing = [k for k in _SAVED_KEYS if k not in saved]
    if missing:
        return None, f"best.json lacks {', '.join(missing)}"
    if not _well_formed(saved):
        return None, "best.json's history or dataset_info is damaged"
    if file_sha256(ckpt) != saved["checkpoint_sha256"]:
        return None, f"{CHECKPOINT_NAME} is not the file best.json describes"
    return saved, ""


def _well_formed(saved: dict) -> bool:
    """The parts of best.json that reuse rebuilds objects from have the shape it needs."""
    history = saved["history"]
    return (isinstance(saved["dataset_info"], dict) and isinstance(history, list) and bool(history)
            and all(isinstance(h, dict) and all(f in h for f in HISTORY_FIELDS) for h in history))


def _same_data(saved_info, data: Dataset) -> bool:
    """Whether a saved `dataset_info` describes `data` (where the files were read from does not
    change the model)."""
    if not isinstance(saved_info, dict):
        return False
    here = json.loads(json.dumps(data.describe(), default=str))
    return {k: v for k, v in saved_info.items() if k != "source"} == {k: v for k, v in here.items() if k != "source"}


def reuse_best(view: StudyView, out: Path, data_dir: str | None, log: Log, artifact: bool = True) -> Retrained | None:
    """The model an earlier report saved in `out`, when it is of the same best trial, configuration,
    data and trainer: evaluated on the test split again (no training) for the charts. None, with
    the reason in the log, when it must be retrained."""
    config = retrain_config(view)
    saved, why = _saved_best(view, out, retrain_key(view, config))
    if saved is not None:
        data = retrain_data(view, torch.device("cpu"), data_dir, log)
        model, _ = load_checkpoint(out / CHECKPOINT_NAME)
        ev = evaluate(model, data.test_x.cpu(), data.test_y.cpu(), data.classes, data.image_shape)
        if not _same_data(saved["dataset_info"], data) or ev.confusion.tolist() != saved["confusion_matrix"]:
            saved, why = None, "its test evaluation differs from best.json's (other data?)"
    if saved is None:
        if why:
            log(f"not reusing {CHECKPOINT_NAME}: {why}")  # the next line says what is done instead
        return None
    log(f"reusing {CHECKPOINT_NAME} of trial {view.best.number} (same config); --retrain to train it again")
    ckpt = out / CHECKPOINT_NAME
    saved["artifact"] = (store_artifact(view.study, view.storage, view.url, ckpt, view.best.number, log)
                         if artifact else None)
    history = _epoch_results(view.best.number, saved["history"])
    charts = retrain_charts(data, ev, history, view.best.number)
    return Retrained(config, data, history, ev, saved["retrain_seconds"], ckpt, saved, charts)


def _epoch_results(number: int, history: list[dict]) -> list[EpochResult]:
    return [EpochResult(key=number, group_size=1, **{f: h[f] for f in HISTORY_FIELDS}) for h in history]


def _checked_on_validation(kept: KeptModel, trial: TrialRow, data: Dataset, log: Log) -> float | None:
    """The kept model's accuracy on the validation split, when it is the trial's (None, with the
    reason in the log, when not): a check at run time of the weights the search took out of its
    population, a path no CPU test here can take the way a GPU does. The loss must agree too (two
    members can be equally accurate): to 0.1% in float32, 2% for a trial in reduced precision on a
    GPU, evaluated in float32 here; rounding may also move a borderline image or two."""
    def refuse(why: str) -> None:
        log(f"not using the search's model of trial {trial.number}: {why}")

    if not _same_data(kept.meta.get("dataset_info"), data):
        return refuse("it was trained on other data than the study's here")
    try:
        val = evaluate(kept.model, data.val_x.cpu(), data.val_y.cpu(), data.classes, data.image_shape)
    except RuntimeError as exc:  # e.g. images of another size under --data-dir
        return refuse(f"it cannot run on the data here ({first_line(exc)})")
    loss = kept.history[-1]["val_loss"]
    loss_tolerance = 1e-3 if kept.meta.get("precision", "fp32") == "fp32" else 2e-2
    if abs(val.accuracy - trial.value) > max(2.5 / val.total, 0.002) or abs(val.loss - loss) > loss_tolerance * loss:
        return refuse(f"on the validation split it scores {val.accuracy:.4f} (loss {val.loss:.4f}), "
                      f"the trial {trial.value:.4f} (loss {loss:.4f})")
    return val.accuracy


def kept_best(view: StudyView, out: Path, data_dir: str | None, log: Log, artifact: bool = True) -> Retrained | None:
    """The best trial's own model as the search kept it (no training): checked on the validation
    split, tested once, saved in `out` byte for byte (so it stays the artifact it came from).
    None when the search did not keep it, or kept something else (see `kept.kept_model`)."""
    best, config = view.best, retrain_config(view)
    kept = kept_model(view, best, config, log)
    if kept is None:
        return None
    data = retrain_data(view, torch.device("cpu"), data_dir, log)
    val_acc = _checked_on_validation(kept, best, data, log)
    if val_acc is None:
        return None
    log(f"testing trial {best.number}'s own model, kept by the search when it finished (no retraining); "
        f"--retrain to train it again")
    ev = evaluate(kept.model, data.test_x.cpu(), data.test_y.cpu(), data.classes, data.image_shape)
    ckpt = atomic_write(out / CHECKPOINT_NAME, lambda tmp: shutil.copyfile(kept.path, tmp))
    art = store_artifact(view.study, view.storage, view.url, ckpt, best.number, log) if artifact else None
    history = _epoch_results(best.number, kept.history)
    device = str(kept.meta.get("device", "unknown"))
    note = (f"the trial's own model, kept by the search when it finished: trained on the study's training split "
            f"(validation held out) for {len(history)} epochs on {device}, not retrained; evaluated once on the "
            f"test split")
    run = _Run(view, config, data, device, TrainResult(kept.model, history), kept.model, ev, kept.seconds, note,
               trained_by="search")
    best_json = _best_json(run, ckpt, art)
    # measured here on the validation split, not the number the search recorded
    best_json.update(validation_accuracy=val_acc, reproduced_study_value=abs(val_acc - best.value) < 1e-6)
    charts = retrain_charts(data, ev, history, best.number)
    return Retrained(config, data, history, ev, kept.seconds, ckpt, best_json, charts)


def tested_best_start(view: StudyView, retrained: Retrained, device: str, data_dir: str | None,
                      log: Log, use_kept: bool = True) -> dict | None:
    """The best [[start]] trial's model tested once, so the report can show what the search gained
    on the test split, not only on validation (where the best of many trials' noisy numbers
    flatters it): its own model as the search kept it (`use_kept`), else retrained (its own seed:
    the trial's model) on the report's device. None when a start is the best trial or the best
    start has no recorded configuration. Reused from best.json when it holds the same start."""
    start = best_start_trial(view.trials)
    if start is None or start.value >= view.best.value:
        return None
    if start.config is None:
        log(f"not testing the best start (trial {start.number}): the study does not record its configuration")
        return None
    saved = retrained.best_json.get("best_start")
    if (isinstance(saved, dict) and saved.get("trial") == start.number and saved.get("config") == start.config
            and isinstance(saved.get("test_accuracy"), float)):
        return saved
    try:
        config = TrainConfig.from_params(start.config)
    except (TypeError, ValueError) as exc:
        log(f"not testing the best start (trial {start.number}): its configuration {first_line(exc)}")
        return None
    kept = kept_model(view, start, config, log) if use_kept else None
    val_acc = _checked_on_validation(kept, start, retrained.data, log) if kept is not None else None
    if val_acc is not None:
        return _tested_kept_start(start, kept, val_acc, retrained.data, log)
    with as_user_error():
        dev = resolve_device(device)
    data = retrained.data if retrained.data.train_x.device == dev else retrain_data(view, dev, data_dir, log)
    log(f"testing the best start beside it: retraining trial {start.number} for {config.epochs} epochs ({dev})")
    result, _, ev, seconds = train_and_test(config, data)
    if abs(result.final.val_acc - start.value) >= 1e-6:
        log(f"note: the retrained start's validation accuracy {result.final.val_acc:.4f} differs from the trial's "
            f"{start.value:.4f} (another device, a population, or other code)")
    return {"trial": start.number, "start": start.start, "config": start.config, "device": str(dev),
            "study_validation_accuracy": start.value, "validation_accuracy": result.final.val_acc,
            "test_accuracy": ev.accuracy, "retrain_seconds": seconds, "stopped": result.stopped,
            "trained_by": "report"}


def _tested_kept_start(start: TrialRow, kept: KeptModel, val_acc: float, data: Dataset, log: Log) -> dict:
    """The best start's own model, kept by the search, tested once (no training)."""
    log(f"testing the best start beside it: trial {start.number}'s own model, kept by the search")
    ev = evaluate(kept.model, data.test_x.cpu(), data.test_y.cpu(), data.classes, data.image_shape)
    return {"trial": start.number, "start": start.start, "config": start.config,
            "device": str(kept.meta.get("device", "unknown")), "study_validation_accuracy": start.value,
            "validation_accuracy": val_acc, "test_accuracy": ev.accuracy,
            "retrain_seconds": kept.seconds, "stopped": None, "trained_by": "search"}

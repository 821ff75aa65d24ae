"""The models the search kept: found among the study's artifacts, checked, loaded.

As trials finish, the search stores the weights of the study's best trial and best [[start]]
(`best_model_trial<N>.pt`, meta `trained_by: "search"`, with the trial's per-epoch history). A
report tests that model instead of training the configuration again when it is the trial's own:
its metadata names the study, trial, configuration and data split and the trial's validation
accuracy, and (checked in retrain.py, once the data is loaded) it scores that accuracy on the
validation split. Anything else (no artifact, its file on another host, a damaged file, a
model a report retrained) is `None`, and the report retrains as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..checkpoint import load_checkpoint
from ..errors import HPSearchError, first_line
from ..specs import TrainConfig
from ..study.schema import StudyAttr, TrialRow
from ..study.view import Log, StudyView, absent_checkpoints_note, trial_checkpoints

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")


@dataclass
class KeptModel:
    """A trial's model as the search trained it (float32, CPU, eval mode) and its checkpoint."""

    model: nn.Module
    meta: dict
    path: Path

    @property
    def history(self) -> list[dict]:
        return self.meta["history"]

    @property
    def seconds(self) -> float:
        """The trial's training time (validation included), summed over its epochs; in a
        population (a GPU), each epoch's time is the whole group's."""
        return float(sum(h["seconds"] for h in self.history))


def _plain(value):
    return json.loads(json.dumps(value, default=str))  # tuples as lists, as the checkpoint's JSON meta


def _mismatch(view: StudyView, trial: TrialRow, config: TrainConfig, meta: dict) -> str | None:
    """Why the kept model is not trial `trial`'s own model under `config`, or None."""
    attrs = view.attrs
    expected = {"study": view.name, "trial": trial.number, "config": _plain(config.to_dict()),
                "dataset": attrs.get(StudyAttr.DATASET), "subset": attrs.get(StudyAttr.SUBSET),
                "val_fraction": attrs.get(StudyAttr.VAL_FRACTION), "split_seed": attrs.get(StudyAttr.SEED),
                "validation_accuracy": trial.value}
    changed = [key for key, value in expected.items() if meta.get(key) != value]
    if changed:
        return f"its {', '.join(changed)} differ{'s' if len(changed) == 1 else ''} from the study's"
    history = meta.get("history")
    if not (isinstance(history, list) and history and all(
            isinstance(h, dict) and all(isinstance(h.get(f), (int, float)) for f in HISTORY_FIELDS)
            and math.isfinite(h["seconds"]) for h in history)):
        return "its training history is damaged"
    return None


def kept_model(view: StudyView, trial: TrialRow, config: TrainConfig, log: Log) -> KeptModel | None:
    """Trial `trial`'s model as the search kept it, when it is that trial's own model under
    `config`; None otherwise (the reason in the log when a kept model was found but not used)."""
    for path in trial_checkpoints(view.study, view.storage, view.url, trial.number):
        try:
            model, ckpt = load_checkpoint(path)
        except HPSearchError as exc:
            log(f"not using the search's model of trial {trial.number}: {first_line(exc)}")
            continue
        meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
        if meta.get("trained_by") != "search":
            continue  # a model a report retrained: that report's folder has what it was tested on
        why = _mismatch(view, trial, config, meta)
        if why is not None:
            log(f"not using the search's model of trial {trial.number}: {why}")
            continue
        return KeptModel(model, meta, path)
    absent = absent_checkpoints_note(view.study, view.storage, view.url, trial.number)
    if absent:
        log(absent)
    return None

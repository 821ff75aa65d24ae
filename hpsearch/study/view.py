"""The read side of a study, for `report`, `studies`, `predict --study` and `dashboard`.

Opens a storage that must already exist, picks the study (by name, or the storage's only one),
finds the best complete trial, and hands the rest of hpsearch plain values: `TrialRow`s, a
summary dict, a trials table. Trained models are Optuna artifacts of the study (finished trials
cannot take new attributes, so they belong to the study and are named `best_model_trial<N>.pt`):
the search keeps its best trial's and best start's, a report stores the one it retrains; they are
found here again for `report`, `export` and `predict --study`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import DEFAULT_STORAGE, DEFAULT_STUDY
from ..errors import HPSearchError, first_line
from .schema import METRIC, StudyAttr, TrialAttr, TrialRow, foreign_reason, study_attrs
from .storage import artifact_dir, error_line, is_storage_error, open_existing_storage, redact

CHECKPOINT_NAME = "best_model.pt"  # the report's copy, in results/<study>/
ARTIFACT_PREFIX = "best_model_trial"  # the study artifact of trial N's model: best_model_trial<N>.pt

Log = Callable[[str], None]


@dataclass
class StudyView:
    """A study opened read-only: its attributes and trials as plain values, and its best trial.

    `study` and `storage` are Optuna's handles, for `charts.py` and `store_artifact`; code outside
    `hpsearch.study` passes them along without looking inside.
    """

    name: str
    url: str
    direction: str  # "maximize" or "minimize"
    attrs: dict  # study user attributes (`StudyAttr` names)
    trials: list[TrialRow]  # by number
    best: TrialRow  # the best complete trial
    study: object  # optuna.Study
    storage: object  # optuna.storages.BaseStorage


def trial_row(trial: FrozenTrial) -> TrialRow:
    """hpsearch's copy of an Optuna trial."""
    return TrialRow(number=trial.number, state=trial.state.name, value=trial.value, params=dict(trial.params),
                    intermediate=dict(trial.intermediate_values), attrs=dict(trial.user_attrs),
                    datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete)


def open_view(url: str, name: str | None) -> StudyView:
    """Open a study for reading (`name` None: the storage's only study, or the default one); one-line
    errors for a missing storage or study and for a study without a complete trial."""
    storage = open_existing_storage(url)
    with unreadable_storage_is_one_line(url):
        study = resolve_study(storage, url, name)
        best = best_complete_trial(study)
        return StudyView(name=study.study_name, url=url, direction=study.direction.name.lower(),
                         attrs=study_attrs(study._storage, study._study_id),
                         trials=[trial_row(t) for t in study.get_trials(deepcopy=False)],
                         best=trial_row(best), study=study, storage=storage)


@contextmanager
def unreadable_storage_is_one_line(url: str) -> Iterator[None]:
    """A damaged database (a corrupt SQLite page) or a failing server, for readers: one line, not a
    bug report. (`run` says the same through its own storage handling.)"""
    try:
        yield
    except HPSearchError:
        raise
    except Exception as exc:  # noqa: BLE001
        if not is_storage_error(exc):
            raise
        hint = "; the file may be damaged (check it with: sqlite3 FILE 'PRAGMA integrity_check')" \
            if url.startswith("sqlite") else ""
        raise HPSearchError(f"cannot read {redact(url)}: {error_line(exc)}{hint}") from None


def _study_names(storage: optuna.storages.BaseStorage, url: str) -> list[str]:
    try:
        return optuna.get_all_study_names(storage)
    except Exception as exc:  # noqa: BLE001 - a file that is not an Optuna database, a dead server...
        raise HPSearchError(f"cannot read studies from {redact(url)}: {first_line(exc)}") from None


def _pick_study(names: list[str], url: str) -> str:
    if len(names) == 1:
        return names[0]
    if DEFAULT_STUDY in names:
        return DEFAULT_STUDY
    if not names:
        raise HPSearchError(f"{redact(url)} holds no studies; run `hpsearch run` first")
    raise HPSearchError(f"{redact(url)} holds {len(names)} studies ({', '.join(sorted(names)[:10])}); "
                        f"pick one with --study NAME")


def resolve_study(storage: optuna.storages.BaseStorage, url: str, name: str | None) -> optuna.Study:
    """Load a study by name; with no name, the storage's only study (or the default one)."""
    names = _study_names(storage, url)
    if name is None:
        name = _pick_study(names, url)
    if name not in names:
        have = f"it holds: {', '.join(sorted(names)[:10])}" if names else "it holds no studies"
        raise HPSearchError(f"no study {name!r} in {redact(url)} ({have})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.load_study(study_name=name, storage=storage)
    reason = foreign_reason([d.name for d in study.directions], study.user_attrs, len(study.trials))
    if reason is not None:
        raise HPSearchError(f"study {name!r} was not created by hpsearch ({reason}); hpsearch reports its own "
                            f"studies only (Optuna's own tools read any study)")
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


# ----------------------------------------------------------------------------------------------
# Tables


def list_studies(storage_url: str) -> list[dict]:
    """One row per study in a storage: trial counts by state, best value, start time."""
    storage = open_existing_storage(storage_url)
    rows = []
    with unreadable_storage_is_one_line(storage_url):
        for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
            trials = storage.get_all_trials(s._study_id, deepcopy=False)
            states = {st.name: sum(t.state == st for t in trials) for st in TrialState}
            foreign = foreign_reason([d.name for d in s.directions], s.user_attrs, len(trials))
            # A foreign study is listed too, without a best: its values need not be accuracies.
            complete = [] if foreign else [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
            rows.append({
                "study": s.study_name, "dataset": "(not hpsearch)" if foreign else s.user_attrs.get(StudyAttr.DATASET),
                "trials": len(trials),
                "complete": states["COMPLETE"], "pruned": states["PRUNED"], "failed": states["FAIL"],
                "running": states["RUNNING"], "best": max(complete) if complete else None,
                "started": s.datetime_start.isoformat(timespec="seconds") if s.datetime_start else None,
            })
    return rows


def study_summary(view: StudyView) -> dict:
    """The study at a glance (summary.json): settings, trial counts, best trial, compute time."""
    trials, best, attrs = view.trials, view.best, view.attrs
    durations = [d for d in (t.seconds for t in trials) if d is not None]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return {
        "study": view.name,
        "storage": redact(view.url),
        "dataset": attrs.get(StudyAttr.DATASET),
        "dataset_info": attrs.get(StudyAttr.DATASET_INFO),
        "family": attrs.get(StudyAttr.FAMILY, "mlp"),
        "subset": attrs.get(StudyAttr.SUBSET),
        "val_fraction": attrs.get(StudyAttr.VAL_FRACTION),
        "epochs": attrs.get(StudyAttr.EPOCHS),
        "seed": attrs.get(StudyAttr.SEED),
        "created": attrs.get(StudyAttr.CREATED),
        "direction": view.direction,
        "trials": len(trials),
        "states": {s.name.lower(): sum(t.state == s.name for t in trials) for s in TrialState},
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "trial_seconds_total": sum(durations),
        "wall_seconds": (max(ends) - min(starts)).total_seconds() if starts and ends else None,
        "devices": sorted({str(t.attrs[TrialAttr.DEVICE]) for t in trials if TrialAttr.DEVICE in t.attrs}),
        "validation_standard_error": standard_error(best.value, validation_images(attrs.get(StudyAttr.DATASET_INFO))),
        "best_start": _best_start(trials, best),
    }


def validation_images(dataset_info) -> int | None:
    """The size of a study's validation split, from its dataset_info attribute (as summary.json
    copies it too); None if unknown or damaged."""
    images = dataset_info.get("validation") if isinstance(dataset_info, dict) else None
    return images if isinstance(images, int) else None


def standard_error(accuracy: float | None, images: int | None) -> float | None:
    """The standard error of an accuracy measured on `images` images (binomial): how far one
    validation accuracy moves by luck. 6,000 images at 0.91: 0.0037; 1,000 at 0.86: 0.011."""
    if accuracy is None or not images or not 0.0 <= accuracy <= 1.0:
        return None
    return math.sqrt(accuracy * (1.0 - accuracy) / images)


def best_start_trial(trials: list[TrialRow]) -> TrialRow | None:
    """The best complete [[start]] trial: what the search is measured against."""
    starts = [t for t in trials if t.start is not None and t.state == "COMPLETE" and t.value is not None]
    return max(starts, key=lambda t: t.value) if starts else None


def _best_start(trials: list[TrialRow], best: TrialRow) -> dict | None:
    """The best start for summary.json, with the search's lead over it (best value minus its)."""
    start = best_start_trial(trials)
    if start is None:
        return None
    return {"trial": start.number, "start": start.start, "value": start.value, "params": start.params,
            "lead": best.value - start.value}


# A lead over the best start smaller than this many validation standard errors may be luck: the
# best of k equally good trials' noisy accuracies exceeds their mean by ~1.9 standard errors for
# k = 20 and ~2.5 for k = 100. Measured on full Fashion-MNIST: a 100-trial study's best led the
# best start by 0.0030 (0.8 standard errors) on validation and tested 0.0035 below it.
NOISE_STANDARD_ERRORS = 2


def lead_within_noise(summary: dict) -> bool:
    """Whether the best trial beats the best start by no more than NOISE_STANDARD_ERRORS validation
    standard errors: then the pick may be luck, and the retrained model's test accuracy says."""
    start, se = summary.get("best_start"), summary.get("validation_standard_error")
    return bool(start and se and 0 < start["lead"] <= NOISE_STANDARD_ERRORS * se)


def start_comparison(summary: dict) -> str | None:
    """The best start against the best trial in words (summary.json's `best_start`, with its test
    accuracy when the report tested it), and a caveat when the validation lead may be luck; None
    when the best trial is a start or there is none."""
    start = summary.get("best_start")
    if not start or start["lead"] <= 0:
        return None
    tested = "test_accuracy" in start
    text = (f"best start: trial {start['trial']} ([[start]] {start['start']}), validation {start['value']:.4f}"
            + (f", test {start['test_accuracy']:.4f}" if tested else "")
            + f"; the search gained {start['lead']:+.4f} on validation"
            + (f", {start['test_lead']:+.4f} on test" if tested else ""))
    if lead_within_noise(summary):
        images = validation_images(summary.get("dataset_info"))
        text += (f" (the validation lead is within {NOISE_STANDARD_ERRORS} standard errors on {images} images, "
                 f"{NOISE_STANDARD_ERRORS} x {summary['validation_standard_error']:.4f}: it may be luck"
                 + ("" if tested else "; retrain to test both") + ")")
    return text


def _cell(value):
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return value


def trials_frame(view: StudyView):
    """One row per trial: number, state, value, times, params_*, user_attrs_* (nested as JSON)."""
    df = view.study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "datetime_complete",
                                            "duration", "params", "user_attrs"))
    df = df.rename(columns={f"value_{METRIC}": "value"})  # the CSV keeps one name whatever the study's metric names
    if "duration" in df:
        df.insert(df.columns.get_loc("duration") + 1, "duration_s", df["duration"].dt.total_seconds())
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(_cell)
    return df


# ----------------------------------------------------------------------------------------------
# Artifacts


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in blocks (artifacts are stored once per distinct content)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _existing_artifact(study, storage, store_dir: Path, filename: str, digest: str) -> str | None:
    for meta in optuna.artifacts.get_all_artifact_meta(study, storage=storage):
        existing = store_dir / meta.artifact_id
        if meta.filename == filename and existing.is_file() and file_sha256(existing) == digest:
            return meta.artifact_id
    return None


class _AtomicFileStore(optuna.artifacts.FileSystemArtifactStore):
    """Optuna's file store, each file written beside its place and renamed into it. Optuna (4.0
    to 5.0) records an artifact before it writes the file: with a plain write, a report or export
    reading the study meanwhile could load half a checkpoint, and a full disk would leave a
    truncated one on record. Now a file is whole or absent (and an absent one is skipped)."""

    def __init__(self, base_path: Path) -> None:
        super().__init__(base_path)
        self.folder = Path(base_path)

    def write(self, artifact_id: str, content_body) -> None:
        from ..checkpoint import atomic_write

        path = self.folder / artifact_id
        if path.parent != self.folder:  # Optuna makes the ids (uuid4): never a path
            raise ValueError(f"invalid artifact id {artifact_id!r}")

        def copy(tmp: str) -> None:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(content_body, f)

        atomic_write(path, copy)


def _upload(study, storage, store_dir: Path, checkpoint: Path, filename: str) -> str:
    store_dir.mkdir(parents=True, exist_ok=True)
    # the artifact takes the name of the uploaded file: upload a copy named best_model_trial<N>.pt
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / filename
        named.write_bytes(checkpoint.read_bytes())
        return optuna.artifacts.upload_artifact(
            artifact_store=_AtomicFileStore(store_dir), file_path=str(named),
            study_or_trial=study, storage=storage, mimetype="application/octet-stream")


def store_artifact(study, storage, url: str, checkpoint: Path, trial_number: int, log: Log) -> dict | None:
    """Upload the checkpoint as a study artifact (once per identical file); returns its description."""
    store_dir = artifact_dir(url)
    filename = f"{ARTIFACT_PREFIX}{trial_number}.pt"
    digest = file_sha256(checkpoint)
    try:
        artifact_id = _existing_artifact(study, storage, store_dir, filename, digest)
        if artifact_id is not None:
            return {"artifact_id": artifact_id, "filename": filename, "store": str(store_dir), "reused": True}
        artifact_id = _upload(study, storage, store_dir, checkpoint, filename)
        return {"artifact_id": artifact_id, "filename": filename, "store": str(store_dir), "reused": False}
    except Exception as exc:  # noqa: BLE001 - a read-only storage still gets its report
        log(f"could not store the checkpoint as an Optuna artifact in {store_dir}: {first_line(exc)}")
        return None


def trial_checkpoints(study, storage, url: str, trial_number: int) -> list[Path]:
    """The stored artifacts of trial `trial_number`'s model (kept by the search, or a report's)
    whose files are here (a worker on another host keeps its files there), newest file first:
    Optuna lists a study's artifacts in the storage's order of its attribute keys (random ids
    on SQLite), not in the order they were stored."""
    paths = [path for path in _trial_artifacts(study, storage, url, trial_number) if path.is_file()]
    return sorted(paths, key=lambda path: path.stat().st_mtime_ns, reverse=True)


def absent_checkpoints_note(study, storage, url: str, trial_number: int) -> str | None:
    """What to say when the study records models of the trial whose files are not here (stored
    by a run on another host, or in another folder for a server storage); None otherwise."""
    absent = [path for path in _trial_artifacts(study, storage, url, trial_number) if not path.exists()]
    if not absent:
        return None
    return (f"the study records a model of trial {trial_number} whose file is not in {artifact_dir(url)} "
            f"(stored by a run on another host or in another folder)")


def _trial_artifacts(study, storage, url: str, trial_number: int) -> list[Path]:
    wanted = f"{ARTIFACT_PREFIX}{trial_number}.pt"
    store_dir = artifact_dir(url)
    return [store_dir / meta.artifact_id for meta in optuna.artifacts.get_all_artifact_meta(study, storage=storage)
            if meta.filename == wanted]


def _checkpoint_meta(path: Path) -> dict | None:
    """A checkpoint's metadata; None for a file that is not a checkpoint."""
    from ..checkpoint import read_checkpoint  # its checks (zip bombs, weights only) before torch.load

    try:
        meta = read_checkpoint(path).get("meta")
    except Exception:  # noqa: BLE001 - load_model will say what is wrong with it
        return None
    return meta if isinstance(meta, dict) else {}


def _is_model_of(meta: dict | None, trial: FrozenTrial) -> bool:
    """Whether a checkpoint's metadata says it is `trial`'s model: its number, and for one the
    search kept, the trial's configuration and validation accuracy too (`report` also runs it
    on the validation split; export and predict have no data to)."""
    if meta is None or meta.get("trial") != trial.number:
        return False
    return meta.get("trained_by") != "search" or (meta.get("config") == trial.user_attrs.get(TrialAttr.CONFIG)
                                                   and meta.get("validation_accuracy") == trial.value)


def find_study_checkpoint(study_name: str | None, storage_url: str = DEFAULT_STORAGE,
                          results_dir: str | os.PathLike = "results") -> Path:
    """The checkpoint of the study's current best trial: its Optuna artifact, else the report's file."""
    storage = open_existing_storage(storage_url)
    study = resolve_study(storage, storage_url, study_name)
    best = best_complete_trial(study)
    for stored in trial_checkpoints(study, storage, storage_url, best.number):
        if _is_model_of(_checkpoint_meta(stored), best):  # else the next one, or the report's
            return stored
    local = Path(results_dir) / study.study_name / CHECKPOINT_NAME
    if local.is_file() and _is_model_of(_checkpoint_meta(local), best):
        return local
    absent = absent_checkpoints_note(study, storage, storage_url, best.number)
    raise HPSearchError(f"study {study.study_name!r} has no checkpoint of its best trial ({best.number}) "
                        f"{'here: ' + absent if absent else 'yet'}; run `hpsearch report --study {study.study_name}` "
                        f"first")


def dashboard_app(storage_url: str, store_dir: Path):
    """optuna-dashboard's WSGI app on an existing storage, serving artifacts from `store_dir`."""
    try:
        import optuna_dashboard
    except ImportError:
        raise HPSearchError("hpsearch dashboard needs optuna-dashboard: pip install 'hpsearch[dashboard]'") from None
    from optuna.artifacts import FileSystemArtifactStore

    storage = open_existing_storage(storage_url)
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HPSearchError(f"cannot create the artifact directory {store_dir}: {exc.strerror or exc}") from None
    return optuna_dashboard.wsgi(storage, artifact_store=FileSystemArtifactStore(store_dir))

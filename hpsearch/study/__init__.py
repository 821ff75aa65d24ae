"""The only package that talks to Optuna (and optuna-dashboard, and SQLAlchemy).

    storage.py   URLs, SQLite WAL and read-only, journal files, server retries, the file lock
    schema.py    every study/trial attribute name, written and read through one definition
    liveness.py  heartbeats, stale trials, retries
    session.py   what the run loop needs: ask, report, prune, finish, abandon, recover, counts
    continuing.py  continuing a study by name: its identity settings come from the study
    view.py      what report/export/predict/dashboard need: studies, trials, best, artifacts
    charts.py    Optuna's own charts and parameter importances
    objective.py Objective: the space and trainer as the objective of a user's own Optuna study
"""

from .liveness import Heartbeat, Liveness, enqueue_retry, liveness_settings, recover_trials, stale_trials
from .schema import COMPLETED, IDENTITY, StudyAttr, TrialAttr, TrialRecord, TrialRow
from optuna import __version__ as OPTUNA_VERSION

from ..config import cli_debug as _cli_debug
from .logs import configure_optuna_logging

from .continuing import continue_settings
from .objective import Objective
from .session import AskedTrial, BestTrial, StudyCounts, StudySession, TrialTaken, make_pruner, open_study, read_outcome
from .view import (ARTIFACT_PREFIX, CHECKPOINT_NAME, NOISE_STANDARD_ERRORS, StudyView, best_complete_trial,
                   best_start_trial, dashboard_app, find_study_checkpoint, lead_within_noise, list_studies,
                   open_view, resolve_study, start_comparison, store_artifact, study_summary, trials_frame)
from .storage import (StudyLock, artifact_dir, error_line, is_storage_error, open_existing_storage, open_storage,
                      redact, storage_file)

__all__ = [
    "AskedTrial", "BestTrial", "Objective", "COMPLETED", "OPTUNA_VERSION", "Heartbeat", "IDENTITY", "Liveness", "StudyAttr", "StudyCounts", "StudyLock", "StudySession",
    "TrialAttr", "TrialRecord", "TrialRow", "TrialTaken", "artifact_dir", "continue_settings", "enqueue_retry", "error_line",
    "is_storage_error", "liveness_settings", "make_pruner", "open_existing_storage", "open_storage", "open_study",
    "read_outcome", "recover_trials", "redact", "stale_trials", "storage_file",
    "ARTIFACT_PREFIX", "CHECKPOINT_NAME", "NOISE_STANDARD_ERRORS", "StudyView", "best_complete_trial",
    "best_start_trial", "dashboard_app", "find_study_checkpoint", "lead_within_noise", "list_studies", "open_view",
    "resolve_study", "start_comparison", "store_artifact", "study_summary", "trials_frame",
]

if _cli_debug() is not None:  # under the CLI: Optuna quiet unless --debug (the CLI set the flag first)
    configure_optuna_logging(_cli_debug())

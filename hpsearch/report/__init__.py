"""`hpsearch report`: a study's storage in, one self-contained results folder out.

Everything comes from the storage (study and trial user attributes, intermediate values), so a
report can be made while the study is still running, or on a study another machine ran. The best
trial's model is the one the search kept when the trial finished (its own weights, no training;
`kept.py`), or, where there is none (a study from elsewhere, files on another host), its
configuration retrained from scratch on the study's training split (same data, same seed: the
same model the trial trained, bit for bit on the CPU); it is evaluated once on the test split,
and saved as a checkpoint. A later report of the same folder reuses that checkpoint while the
best trial, its configuration, the data and the trainer are unchanged (it only tests it again);
`retrain=True` retrains anyway, `retrain=False` neither retrains nor tests.

    results/<study>/
      index.html          one page, opens offline, links everything
      plotly.min.js       plotly.js, the folder's only copy: index.html and the charts load it (no CDN)
      charts/*.html       each chart alone (loading ../plotly.min.js)
      trials.csv          one row per trial: params, state, value, duration, user attrs
      summary.json        the study at a glance: settings, trial counts, best trial, importances
      best.json           best params, validation and test accuracy, per-class P/R/F1, versions
      best_model.pt       the best model: state_dict + spec (torch.load(weights_only=True))

The checkpoint is also an Optuna artifact of the study (a file-system artifact store beside the
database), so optuna-dashboard lists it: the search's own when it kept one, else the retrained
one is stored. Finished trials cannot take new attributes in Optuna, so the artifact belongs to
the study and is named `best_model_trial<N>.pt`.

This package never imports Optuna: it reads the study through `hpsearch.study.view` (plain
`TrialRow`s and dicts) and draws Optuna's own charts through `hpsearch.study.charts`.

    build.py     write_report: the steps, in order
    retrain.py   the best model (reused, kept by the search, or retrained), tested once, best.json
    kept.py      the models the search kept: found among the study's artifacts, checked, loaded
    figures.py   hpsearch's own figures (learning curves, size, confusion matrix, galleries)
    html.py      index.html
"""

from ..study.charts import IMPORTANCE_EVALUATORS
from ..study.storage import artifact_dir
from ..study.view import ARTIFACT_PREFIX, CHECKPOINT_NAME, find_study_checkpoint, store_artifact
from .build import study_charts, write_report
from .figures import Chart
from .html import render_index
from .retrain import RETRAIN_VERSION, Evaluation, Retrained, evaluate, retrain_best, reuse_best, versions

__all__ = [
    "ARTIFACT_PREFIX", "CHECKPOINT_NAME", "Chart", "Evaluation", "IMPORTANCE_EVALUATORS", "RETRAIN_VERSION",
    "Retrained", "artifact_dir", "evaluate", "find_study_checkpoint", "render_index", "retrain_best", "reuse_best",
    "store_artifact", "study_charts", "versions", "write_report",
]

"""The `hpsearch` command end to end, in real subprocesses, on real Fashion-MNIST."""

import json
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState


def hpsearch(*args, cwd, check=True):
    proc = subprocess.run([sys.executable, "-m", "hpsearch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"hpsearch {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


RUN = ["run", "--dataset", "fashion-mnist", "--epochs", "3", "--subset", "3000", "--device", "cpu",
       "--pruner", "median"]


def test_study_runs_then_resumes(tmp_path):
    db = tmp_path / "nested" / "s.db"
    storage = f"sqlite:///{db}"
    first = hpsearch(*RUN, "--trials", "3", "--storage", storage, "--study", "cli", cwd=tmp_path)
    assert "done: 3 trials" in first.stdout and "best" in first.stdout and "Traceback" not in first.stderr
    study = optuna.load_study(study_name="cli", storage=storage)
    first_trials = {t.number: t for t in study.trials}
    assert len(first_trials) == 3

    second = hpsearch(*RUN, "--trials", "5", "--storage", storage, "--study", "cli", cwd=tmp_path)
    assert "continuing: 3 of 5" in second.stdout and "done: 2 trials" in second.stdout
    study = optuna.load_study(study_name="cli", storage=storage)
    trials = study.trials
    assert len(trials) == 5
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # finished trials were not redone, and the resumed run sampled new points
    for number, t in first_trials.items():
        assert trials[number].params == t.params and trials[number].datetime_complete == t.datetime_complete
    assert trials[3].params != trials[0].params and trials[4].params != trials[1].params
    for t in trials:
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and steps  # one value per epoch, 1-based
        assert all(0.0 <= v <= 1.0 for v in t.intermediate_values.values())
        a = t.user_attrs
        assert a["epochs_run"] == len(steps)
        assert a["seconds_per_epoch"] > 0 and a["param_count"] > 0 and a["device"].startswith("cpu")
        assert a["config"]["epochs"] == 3 and len(a["curves"]["val_acc"]) == len(steps)
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(t.intermediate_values[3]) and a["epochs_run"] == 3
    assert study.best_value > 0.5  # 3 epochs on 2700 images: well above chance (0.1)
    assert study.user_attrs["dataset"] == "fashion-mnist" and study.user_attrs["subset"] == 3000

    listed = json.loads(hpsearch("studies", "--storage", storage, "--json", cwd=tmp_path).stdout)
    assert listed[0]["study"] == "cli" and listed[0]["trials"] == 5
    assert listed[0]["best"] == pytest.approx(study.best_value)

    # changing what the study measures is refused, and nothing is written
    changed = hpsearch(*RUN[:-4], "--epochs", "4", "--trials", "6", "--storage", storage, "--study", "cli",
                       cwd=tmp_path, check=False)
    assert changed.returncode != 0 and "epochs" in changed.stderr and "Traceback" not in changed.stderr
    assert len(optuna.load_study(study_name="cli", storage=storage).trials) == 5


def test_a_timeout_without_trials_searches_until_the_time_is_up(tmp_path):
    """`hpsearch run --timeout S` is S seconds of search, not "up to the default 20 trials" (which
    stopped a full-data study after ~4.5 of 10 minutes on 2 cores): on a study that holds 20
    trials already, it still adds trials."""
    from conftest import make_idx_dir

    data = make_idx_dir(tmp_path / "data")
    run = ["run", "--dataset", "idx", "--data-dir", str(data), "--epochs", "1", "--device", "cpu",
           "--no-start", "--storage", f"sqlite:///{tmp_path}/s.db", "--study", "t"]
    hpsearch(*run, "--trials", "20", cwd=tmp_path)
    proc = hpsearch(*run, "--timeout", "2", cwd=tmp_path)
    assert "nothing to do" not in proc.stdout and "stopped by timeout" in proc.stdout, proc.stdout
    assert "continuing: 20 trials already finished" in proc.stdout  # no target to count towards
    assert len(optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path}/s.db").trials) > 20


def test_default_storage_is_studies_sqlite(tmp_path):
    hpsearch(*RUN, "--trials", "1", "--epochs", "1", cwd=tmp_path)
    assert (tmp_path / "studies" / "hpsearch.db").exists()


@pytest.mark.parametrize("args,needle", [
    (["run", "--trials", "0"], "--trials"),
    (["run", "--epochs", "0"], "--epochs"),
    (["run", "--dataset", "cifar"], "unknown dataset"),
    (["run", "--study", "../evil"], "invalid study name"),
    (["run", "--pruner", "magic"], "unknown pruner"),
    (["run", "--population", "zero"], "--population"),
    (["run", "--dataset", "idx"], "IDX files"),
    (["run", "--storage", "notadb://x"], "cannot open storage"),
    (["studies", "--storage", "sqlite:///nope/none.db"], "no study storage at"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, needle):
    proc = hpsearch(*args, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_help_on_every_command(tmp_path):
    for cmd in ("run", "studies", "bench"):
        out = hpsearch(cmd, "--help", cwd=tmp_path).stdout
        assert "Usage" in out

"""Workers started at the same moment with different settings on a new study: whoever creates the
study fixes its settings; the others match them or are refused in one line."""

import os
import subprocess
import sys

import optuna
import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
STORAGES = {"sqlite": "sqlite:///{tmp}/s.db", "journal": "journal:{tmp}/s.log"}
if os.environ.get("HPSEARCH_TEST_POSTGRES"):
    STORAGES["postgresql"] = os.environ["HPSEARCH_TEST_POSTGRES"]


def _start(storage, study, epochs, seed, fashion_dir, cwd):
    args = [sys.executable, "-m", "hpsearch", "run", "--study", study, "--trials", "2", "--epochs", str(epochs),
            "--seed", str(seed), "--subset", "600", "--no-start", "--storage", storage,
            "--data-dir", str(fashion_dir), "--device", "cpu"]
    return subprocess.Popen(args, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kind", list(STORAGES))
@pytest.mark.parametrize("attempt", range(3))
def test_simultaneous_starts_with_different_settings_one_study_one_setting(kind, attempt, fashion_dir, tmp_path):
    storage = STORAGES[kind].format(tmp=tmp_path)
    study = f"race-{kind}-{attempt}-{os.getpid()}"
    # Data loading takes a second or two: started together, both reach the study at about the same time.
    procs = [_start(storage, study, epochs, seed, fashion_dir, tmp_path) for epochs, seed in ((1, 0), (3, 7))]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    refused = [err for code, _, err in results if code == 2]
    assert codes == [0, 2], results
    lines = [line for line in refused[0].splitlines() if line.strip()]
    assert len(lines) == 1 and "was created with" in lines[0] and "pick a new --study" in lines[0], refused[0]
    from hpsearch.study import open_storage

    loaded = optuna.load_study(study_name=study, storage=open_storage(storage))
    epochs_run = {t.user_attrs["config"]["epochs"] for t in loaded.trials if t.state.is_finished()}
    assert len(epochs_run) == 1 and loaded.user_attrs["epochs"] in epochs_run, (epochs_run, loaded.user_attrs)
    assert len(loaded.trials) == 2

"""What a study looks like to Optuna's own tools: exact accuracies, a named objective, a short
user-attribute table (the long values are system attributes)."""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest


@pytest.fixture(scope="module")
def small_study(fashion_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attrs")
    storage = f"sqlite:///{tmp}/s.db"
    done = subprocess.run([sys.executable, "-m", "hpsearch", "run", "--study", "a", "--trials", "3", "--epochs", "2",
                           "--subset", "700", "--no-start", "--storage", storage, "--data-dir", str(fashion_dir),
                           "--device", "cpu"], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return storage, optuna.load_study(study_name="a", storage=storage)


def test_accuracies_are_exact_fractions_of_the_validation_set(small_study):
    _, study = small_study
    n_val = study.user_attrs["subset"] // 10
    values = [v for t in study.trials for v in (t.value, *t.intermediate_values.values()) if v is not None]
    assert len(values) >= 3
    for v in values:
        assert v == round(v * n_val) / n_val, v  # 0.851, not 0.8510000109672546


def test_the_objective_is_named(small_study):
    _, study = small_study
    assert study.metric_names == ["val_accuracy"]
    assert "value_val_accuracy" in study.trials_dataframe().columns


def test_optuna_studies_prints_a_short_table(small_study):
    storage, study = small_study
    assert "space" not in study.user_attrs and "dataset_info" not in study.user_attrs
    system = study._storage.get_study_system_attrs(study._study_id)
    assert system["hpsearch:space"]["params"] and system["hpsearch:dataset_info"]
    optuna_cli = Path(sys.executable).with_name("optuna")
    out = subprocess.run([str(optuna_cli), "studies", "--storage", storage], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "a" in out and max(len(line) for line in out.splitlines()) < 400, out

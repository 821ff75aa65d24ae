"""Studies hpsearch did not create: never trained into, listed and refused by report in one line."""

import optuna
import pytest

from conftest import assert_one_line_error, cli


def _foreign_studies(storage):
    def objective(trial):
        return trial.suggest_float("x", -1, 1) ** 2

    minimize = optuna.create_study(study_name="minimize", storage=storage)  # Optuna's default direction
    minimize.optimize(objective, n_trials=2)
    optuna.create_study(study_name="empty-minimize", storage=storage)
    other = optuna.create_study(study_name="other-params", storage=storage, direction="maximize")
    other.optimize(objective, n_trials=2)
    multi = optuna.create_study(study_name="multi", storage=storage, directions=["maximize", "minimize"])
    multi.optimize(lambda t: (objective(t), 1.0), n_trials=2)


@pytest.fixture()
def storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/s.db"
    _foreign_studies(url)
    return url


def _trial_counts(url):
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(url)}


@pytest.mark.parametrize("name, reason", [
    ("minimize", "it minimizes its objective"), ("empty-minimize", "it minimizes its objective"),
    ("other-params", "its 2 trials were not made by hpsearch"), ("multi", "it has 2 objectives"),
])
def test_run_refuses_a_study_it_did_not_create(storage, fashion_dir, name, reason, monkeypatch, capsys):
    before = _trial_counts(storage)
    code, _, err = cli(["run", "--study", name, "--storage", storage, "--trials", "1", "--epochs", "1",
                        "--subset", "600", "--data-dir", str(fashion_dir), "--device", "cpu"], monkeypatch, capsys)
    assert_one_line_error(code, err, f"study '{name}'", "was not created by hpsearch", reason, "pick another --study")
    assert code == 2 and _trial_counts(storage) == before  # not one FAIL trial left in someone else's study


def test_studies_lists_foreign_studies_and_report_refuses_them(storage, monkeypatch, capsys):
    code, out, err = cli(["studies", "--storage", storage, "--json"], monkeypatch, capsys)
    assert code in (0, None), err
    import json

    rows = {r["study"]: r for r in json.loads(out)}
    assert set(rows) == {"minimize", "empty-minimize", "other-params", "multi"}
    assert all(r["dataset"] == "(not hpsearch)" and r["best"] is None for r in rows.values())
    for name in ("minimize", "multi", "other-params"):
        code, _, err = cli(["report", "--study", name, "--storage", storage], monkeypatch, capsys)
        assert_one_line_error(code, err, "was not created by hpsearch")

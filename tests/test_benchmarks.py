"""The benchmark scripts still run against the code they measure (they reach into the search
loop and the study session, so a refactor can break them without any other test noticing)."""

import sys
from pathlib import Path

import optuna
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_storage_scale_measures_trials_without_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the spawned workers import storage_scale too
    import storage_scale

    for url in (f"sqlite:///{tmp_path}/s.db", f"journal:{tmp_path}/j.log"):
        row = storage_scale.measure(url, workers=2, seconds=3.0, epochs=3)
        assert row["errors"] == 0, row["first_error"]
        assert row["trials"] > 0 and row["trials_per_s"] > 0, row


def test_search_benchmark_refuses_unknown_methods(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import search

    monkeypatch.setattr(sys, "argv", ["search.py", "--methods", "default,bogus"])
    with pytest.raises(SystemExit) as exc:
        search.main()
    assert exc.value.code == 2
    assert "unknown method(s) bogus" in capsys.readouterr().err


def test_search_benchmark_summarizes_gains_over_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import search

    runs = [{"starts": {"test_acc": 0.90}, "rows": [{"budget_s": 600, "method": "default", "test_acc": 0.905},
                                                     {"budget_s": 600, "method": "random", "test_acc": None}]},
            {"starts": {"test_acc": 0.91}, "rows": [{"budget_s": 600, "method": "default", "test_acc": 0.909},
                                                     {"budget_s": 600, "method": "random", "test_acc": 0.912}]}]
    default, random = search.summarize(runs)
    assert (default["method"], default["tested"], default["at_or_above"]) == ("default", 2, 1)
    assert default["gain_mean"] == pytest.approx(0.002) and default["gain_worst"] == pytest.approx(-0.001)
    assert default["test_mean"] == pytest.approx(0.907)
    assert (random["seeds"], random["tested"], random["gain_mean"]) == (2, 1, pytest.approx(0.002))
    assert random["test_mean"] == pytest.approx(0.912)  # only the seed that has a test


def test_search_benchmark_refuses_a_bad_seed_list(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import search

    for seeds, message in (("0,x", "--seed takes integers"), ("0,1,0", "--seed lists a seed twice")):
        monkeypatch.setattr(sys, "argv", ["search.py", "--seed", seeds])
        with pytest.raises(SystemExit) as exc:
            search.main()
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_selection_benchmark_retrains_the_top_trials_as_they_were(tmp_path, monkeypatch):
    """benchmarks/selection.py tests a study's top trials: each retrained model must be the trial's
    own (same validation accuracy), and each signal's pick must be the trial it ranks first."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import selection
    from conftest import make_idx_dir
    from hpsearch.config import RunSettings
    from hpsearch.search import run_study

    data = make_idx_dir(tmp_path / "data", n_train=300)
    url = f"sqlite:///{tmp_path}/s.db"
    run_study(RunSettings(trials=4, study="s", storage=url, dataset="idx", data_dir=str(data), epochs=2,
                          device="cpu", pruner="none", start=False, sampler="random"))
    numbers = selection.top_trials(url, "s", top=3)
    values = {t.number: t.value for t in optuna.load_study(study_name="s", storage=url).trials}
    assert len(numbers) == 3 and [values[n] for n in numbers] == sorted(values.values(), reverse=True)[:3]
    rows = [selection._test_one(url, "s", n) for n in numbers]
    assert [r["trial"] for r in rows] == numbers
    assert [r["val_acc"] for r in rows] == [values[n] for n in numbers]  # the trials' own models
    assert all(0 <= r["test_acc"] <= 1 for r in rows)


def test_selection_summary_ranks_each_signal_against_test(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import selection

    rows = [{"trial": 1, "val_acc": 0.91, "val_loss": 0.35, "test_acc": 0.900},
            {"trial": 2, "val_acc": 0.90, "val_loss": 0.33, "test_acc": 0.907},
            {"trial": 3, "val_acc": 0.89, "val_loss": 0.34, "test_acc": 0.903}]
    summary = selection.summarize(rows)
    assert summary["val_acc"] == {"spearman_with_test": -0.5, "picks": 1, "pick_test_acc": 0.900}
    assert summary["-val_loss"] == {"spearman_with_test": 1.0, "picks": 2, "pick_test_acc": 0.907}

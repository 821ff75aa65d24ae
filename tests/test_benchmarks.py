"""The benchmark scripts still run against the code they measure (they reach into the search
loop and the study session, so a refactor can break them without any other test noticing)."""

import sys
from pathlib import Path

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
    rows = [selection._test_one(url, "s", n) for n in numbers]
    assert len(rows) == 3 and [r["trial"] for r in rows] == numbers
    assert [r["val_acc"] for r in rows] == [r["study_val_acc"] for r in rows]
    assert rows[0]["val_acc"] == max(r["val_acc"] for r in rows)
    summary = selection.summarize(rows)
    assert summary["val_acc"]["picks"] == numbers[0]
    lowest_loss = min(rows, key=lambda r: r["val_loss"])
    assert summary["-val_loss"]["picks"] == lowest_loss["trial"]
    assert summary["-val_loss"]["pick_test_acc"] == lowest_loss["test_acc"]

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

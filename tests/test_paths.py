"""From a directory other than the clone, a missing storage is named by its absolute path."""

import pytest

from conftest import assert_one_line_error, cli


@pytest.mark.parametrize("command", [
    ["studies"],
    ["report"],
    ["report", "--study", "s"],
    ["export", "--study", "s", "--format", "onnx", "--out", "m.onnx"],
    ["predict", "--study", "s", "x.png"],
    ["dashboard", "--port", "0"],
])
def test_a_missing_storage_is_named_by_its_absolute_path(command, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = cli(command, monkeypatch, capsys)
    assert_one_line_error(code, err, f"no study storage at {elsewhere}/studies/hpsearch.db", "--storage")
    assert not (elsewhere / "studies").exists()  # reading creates nothing

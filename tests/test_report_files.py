"""The report writes only inside its folder: names from the database are checked, links inside the
folder are replaced (never written through), and a full disk names the file."""

import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from conftest import assert_one_line_error, cli


@pytest.fixture(scope="module")
def study_db(fashion_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report-files")
    done = subprocess.run([sys.executable, "-m", "hpsearch", "run", "--study", "s", "--trials", "2", "--epochs", "1",
                           "--subset", "600", "--storage", f"sqlite:///{tmp}/s.db", "--data-dir", str(fashion_dir),
                           "--device", "cpu"], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return tmp / "s.db"


@pytest.fixture()
def workdir(study_db, tmp_path, monkeypatch):
    shutil.copy(study_db, tmp_path / "s.db")
    (tmp_path / "inside").mkdir()
    monkeypatch.chdir(tmp_path / "inside")
    return tmp_path


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/hpsearch-abs-escape", "a/b"])
def test_a_study_name_from_the_database_never_becomes_a_path_outside_results(workdir, name, monkeypatch, capsys):
    with sqlite3.connect(workdir / "s.db") as con:
        con.execute("UPDATE studies SET study_name = ?", (name,))
    before = sorted(p for p in workdir.rglob("*"))
    code, _, err = cli(["report", "--storage", f"sqlite:///{workdir}/s.db", "--no-retrain"], monkeypatch, capsys)
    assert_one_line_error(code, err, "cannot name a folder under results/", "--out DIR")
    assert code == 2 and sorted(p for p in workdir.rglob("*")) == before
    assert not os.path.exists("/tmp/hpsearch-abs-escape")


def test_links_inside_the_report_folder_are_replaced_not_written_through(workdir, monkeypatch, capsys):
    out = workdir / "inside" / "results" / "s"
    (out / "charts").mkdir(parents=True)
    victims = {}
    for name in ("trials.csv", "summary.json", "index.html", "best.json", "plotly.min.js", "charts/history.html"):
        victim = workdir / f"victim-{name.replace('/', '-')}"
        victim.write_text("keep me")
        (out / name).symlink_to(victim)
        victims[name] = victim
    code, _, err = cli(["report", "--storage", f"sqlite:///{workdir}/s.db", "--no-retrain"], monkeypatch, capsys)
    assert code in (0, None), err
    assert all(v.read_text() == "keep me" for v in victims.values())
    for name in ("trials.csv", "summary.json", "index.html", "plotly.min.js", "charts/history.html"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name


def test_a_full_disk_during_report_names_the_file(workdir, monkeypatch, capsys):
    disk = workdir / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - 8192))
        code, _, err = cli(["report", "--storage", f"sqlite:///{workdir}/s.db", "--no-retrain", "--out", str(disk / "r")],
                           monkeypatch, capsys)
        assert_one_line_error(code, err, "No space left on device", str(disk / "r") + "/")
        assert ".tmp" not in err and [p.name for p in (disk / "r").rglob("*.tmp")] == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)

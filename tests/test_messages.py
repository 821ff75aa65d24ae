"""What a user reads when something is off: the message must be true, one line, and name the thing."""

import signal
import subprocess
import sys

import optuna
import pytest

from conftest import assert_one_line_error, cli


def test_studies_on_an_empty_file_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty.db"
    empty.touch()
    code, _, err = cli(["studies", "--storage", f"sqlite:///{empty}"], monkeypatch, capsys)
    assert_one_line_error(code, err, f"{empty} is empty, not a study database")
    assert code == 2 and empty.stat().st_size == 0  # Optuna's tables were created in it before


def test_a_corrupt_database_page_is_one_line_for_report_and_run(fashion_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "c.db"
    done = subprocess.run([sys.executable, "-m", "hpsearch", "run", "--study", "c", "--trials", "3", "--epochs", "1",
                           "--subset", "600", "--no-start", "--storage", f"sqlite:///{db}", "--data-dir",
                           str(fashion_dir), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with open(db, "r+b") as f:  # a damaged page in the middle of the file (a bad disk, a torn copy)
        f.seek(5 * 4096)
        f.write(b"\xde\xad\xbe\xef" * 1024)
    for command in (["report", "--no-retrain"], ["run", "--study", "c", "--trials", "4", "--epochs", "1",
                                                  "--subset", "600", "--data-dir", str(fashion_dir)]):
        code, _, err = cli([*command, "--storage", f"sqlite:///{db}"], monkeypatch, capsys)
        assert_one_line_error(code, err, "malformed")
        assert code == 2 and "unexpected" not in err, err
    assert not (tmp_path / "results").exists()


def test_workers_interrupted_after_the_study_was_complete_say_nothing_is_left(tmp_path):
    from hpsearch.config import RunSettings
    from hpsearch.workers import _conclude

    url = f"sqlite:///{tmp_path}/w.db"
    study = optuna.create_study(study_name="w", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    out, err = [], []
    code = _conclude(RunSettings(trials=2, study="w", storage=url), [143, 143], signal.SIGTERM, out.append, err.append)
    assert code == 143 and len(err) == 1
    assert "after the study was complete (2 of 2 trials finished)" in err[0] and "same command" not in err[0]


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_the_dashboard_warns_when_it_listens_beyond_this_machine(tmp_path, host, warned):
    pytest.importorskip("optuna_dashboard")
    url = f"sqlite:///{tmp_path}/d.db"
    optuna.create_study(study_name="d", storage=url, direction="maximize")
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch", "dashboard", "--storage", url, "--host", host,
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "optuna-dashboard for" in proc.stdout.readline()  # serving: the warning came before
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert ("exposes the study and its checkpoints to the network" in err) == warned, err


def test_an_interrupt_inside_a_library_is_quiet_and_not_lost():
    """SIGTERM raised inside SQLAlchemy's cleanup of a collected connection made it log
    "Exception during reset or similar" with a traceback (fresh-clone CI); the CLI drops such
    records, and only such records. Raised in a finalizer, the interrupt would be swallowed
    ("Exception ignored in"): the CLI sends the signal again."""
    script = """
import logging, signal, sys
from hpsearch import cli
from hpsearch.errors import Interrupted
sys.argv = ["hpsearch", "--version"]
try:
    cli.main()  # installs the handlers and the guards, as every command does
except SystemExit:
    pass
log = logging.getLogger("sqlalchemy.pool.impl.QueuePool")
try:
    raise Interrupted(signal.SIGTERM)
except Interrupted:
    log.error("Exception during reset or similar", exc_info=True)
try:
    raise RuntimeError("disk on fire")
except RuntimeError:
    log.error("a real failure", exc_info=True)

class Finalized:
    def __del__(self):
        raise Interrupted(signal.SIGTERM)

try:
    Finalized()  # dropped at once: its finalizer's exception cannot propagate
    import time
    for _ in range(100):  # up to 1 s for the signal to come back
        time.sleep(0.01)
    print("interrupt lost")
except Interrupted:
    print("interrupted after the finalizer")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Exception during reset" not in done.stderr and "Interrupted" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
    assert "a real failure" in done.stderr and "disk on fire" in done.stderr
    assert "interrupted after the finalizer" in done.stdout, done.stdout

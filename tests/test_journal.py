"""Journal storage: a half-written line (full disk, killed writer) never makes a study unreadable,
and a SIGKILLed writer does not leave a lock behind for the others to wait on."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hpsearch.study.journal import RepairingJournalBackend, complete_length

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run(args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "hpsearch", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _valid_lines(path):
    lines = open(path, "rb").read().split(b"\n")
    assert lines[-1] == b""  # ends with a newline
    return [json.loads(line) for line in lines[:-1]]


def test_a_torn_last_line_is_cut_before_the_next_append(tmp_path):
    path = str(tmp_path / "j.log")
    backend = RepairingJournalBackend(path)
    backend.append_logs([{"op_code": 0, "worker_id": "a"}])
    with open(path, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"b","study_id"')  # a writer died here
    assert complete_length(path) < os.path.getsize(path)
    RepairingJournalBackend(path).append_logs([{"op_code": 1, "worker_id": "c"}])
    assert [log["worker_id"] for log in _valid_lines(path)] == ["a", "c"]


@pytest.fixture()
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()[:100]}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_mid_run_loses_nothing_and_the_same_command_continues(small_disk, fashion_dir, tmp_path):
    args = ["run", "--study", "s", "--trials", "4", "--epochs", "2", "--subset", "600", "--no-start",
            "--data-dir", str(fashion_dir), "--device", "cpu"]
    measure = _run([*args, "--storage", f"journal:{tmp_path}/measure.log"], tmp_path)
    assert measure.returncode == 0, measure.stderr
    full_size = os.path.getsize(tmp_path / "measure.log")
    # Leave room for about half of the run's journal: the disk fills in the middle of the run.
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - full_size // 2))
    storage = f"journal:{small_disk}/j.log"
    first = _run([*args, "--storage", storage], tmp_path)
    assert first.returncode != 0 and "run the same command again" in first.stderr, first.stderr
    assert "Traceback" not in first.stderr
    (small_disk / "filler").unlink()
    again = _run([*args, "--storage", storage], tmp_path)  # the advice printed, followed
    assert again.returncode == 0, again.stderr
    listed = _run(["studies", "--storage", storage, "--json"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    row = json.loads(listed.stdout)[0]
    assert row["complete"] + row["pruned"] == 4 and row["running"] == 0
    _valid_lines(small_disk / "j.log")


def test_a_killed_writer_leaves_no_lock_to_wait_for(tmp_path):
    """A process SIGKILLed while holding the journal lock: the next writer goes on at once."""
    path = str(tmp_path / "j.log")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from hpsearch.study.journal import RepairingJournalBackend\n"
        f"b = RepairingJournalBackend({path!r}); b._lock.acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    t0 = time.monotonic()
    RepairingJournalBackend(path).append_logs([{"op_code": 0, "worker_id": "next"}])
    assert time.monotonic() - t0 < 5  # Optuna's symlink lock made it wait out a 30 s grace period
    assert _valid_lines(path) == [{"op_code": 0, "worker_id": "next"}]

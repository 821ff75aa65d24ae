"""`hpsearch dashboard`: optuna-dashboard on a temporary study, read over HTTP (page, API, artifact)."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

pytest.importorskip("optuna_dashboard")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


def test_dashboard_serves_study_and_checkpoint_artifact(tmp_path):
    from hpsearch.report import store_artifact

    storage_url = f"sqlite:///{tmp_path}/studies/dash.db"
    (tmp_path / "studies").mkdir()
    study = optuna.create_study(study_name="dash-study", storage=storage_url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=3)
    checkpoint = tmp_path / "best_model.pt"
    checkpoint.write_bytes(b"checkpoint bytes")
    art = store_artifact(study, study._storage, storage_url, checkpoint, study.best_trial.number, print)
    assert art is not None and (tmp_path / "studies" / "artifacts" / art["artifact_id"]).is_file()

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch", "dashboard", "--storage", storage_url,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                status, page = get(base + "/")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"dashboard did not start: {proc.communicate(timeout=5)}")
                time.sleep(0.3)
        assert status == 200 and b"<html" in page.lower()

        status, body = get(base + "/api/studies")
        studies = json.loads(body)["study_summaries"]
        assert status == 200 and [s["study_name"] for s in studies] == ["dash-study"]
        study_id = studies[0]["study_id"]
        status, body = get(f"{base}/api/studies/{study_id}")
        detail = json.loads(body)
        assert status == 200 and len(detail["trials"]) == 3
        listed = {a["filename"]: a["artifact_id"] for a in detail["artifacts"]}
        assert listed == {f"best_model_trial{study.best_trial.number}.pt": art["artifact_id"]}
        status, body = get(f"{base}/artifacts/{study_id}/{art['artifact_id']}")
        assert status == 200 and body == b"checkpoint bytes"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert f"http://127.0.0.1:{port}/" in out  # bound to this machine only by default


def test_dashboard_needs_an_existing_storage(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpsearch", "dashboard", "--storage", f"sqlite:///{tmp_path}/no.db",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no study storage" in proc.stderr
    assert not (tmp_path / "no.db").exists()

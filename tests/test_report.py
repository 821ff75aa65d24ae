"""`hpsearch report` on a real (small) CPU study on Fashion-MNIST: files, numbers, artifact, errors."""

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

CHARTS = ("importance", "history", "best_over_time", "intermediate", "parallel", "slice", "contour", "size", "timeline",
          "confusion_matrix", "misclassified", "retrain_curves", "samples")

from conftest import assert_one_line_error, cli


def assert_one_plotly_js(out):
    """plotly.js is written once in a report folder: plotly.min.js, beside index.html."""
    from plotly.offline import get_plotlyjs

    head = get_plotlyjs()[:2000].encode()
    copies = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and head in p.read_bytes()]
    assert copies == ["plotly.min.js"], copies
    assert (out / "plotly.min.js").read_text() == get_plotlyjs()


def copy_db(src, dst):
    """Copy a SQLite database consistently (WAL mode: the file alone may not hold everything yet)."""
    with sqlite3.connect(src) as source, sqlite3.connect(dst) as target:
        source.backup(target)
    target.close()
    source.close()


@pytest.fixture(scope="module")
def study_report(tmp_path_factory, fashion_dir):
    from hpsearch.report import write_report
    from hpsearch.search import RunSettings, run_study

    tmp = tmp_path_factory.mktemp("report")
    storage = f"sqlite:///{tmp}/studies/s.db"
    summary = run_study(RunSettings(trials=4, epochs=2, subset=3000, storage=storage, study="t", device="cpu",
                                    data_dir=str(fashion_dir), pruner="none"))
    assert summary.best_value is not None
    logs = []
    index = write_report("t", storage, tmp / "report", retrain=True, log=logs.append)
    return {"tmp": tmp, "storage": storage, "out": tmp / "report", "index": index, "logs": logs}


def test_report_writes_every_file(study_report):
    out = study_report["out"]
    assert study_report["index"] == out / "index.html"
    for name in ("index.html", "trials.csv", "best.json", "best_model.pt", "summary.json", "plotly.min.js"):
        assert (out / name).is_file(), name
    assert_one_plotly_js(out)
    for chart in CHARTS:
        page = (out / "charts" / f"{chart}.html").read_text()
        assert re.search(r'<script[^>]*src="../plotly.min.js"', page), chart  # opens offline: the folder's copy
    page = study_report["index"].read_text()
    # offline: plotly.js from the folder's one copy, nothing fetched from the network
    assert re.findall(r"<script[^>]+src=[\"']([^\"']+)", page) == ["plotly.min.js"]
    assert "cdn.plot.ly" not in page and not re.search(r"(src|href)=[\"']https?:", page)
    for chart in CHARTS:
        assert f'id="chart-{chart}"' in page, chart
        assert f"charts/{chart}.html" in page
    assert "PED-ANOVA" in page  # says which importance evaluator
    for text in ("fashion-mnist", "best validation accuracy", "total compute time", "test accuracy",
                 "best starting configuration"):
        assert text in page


def test_best_so_far_marks_the_starting_configurations(study_report):
    from hpsearch.report.figures import best_so_far_points
    from hpsearch.study import open_view

    view = open_view(study_report["storage"], "t")
    points = best_so_far_points(view.trials)
    values = [v for _, v, _ in points]
    assert values == sorted(values) and values[-1] == view.best.value
    assert points[0][2].start == 1  # the first trial is the first [[start]] configuration
    assert [m for m, _, _ in points] == sorted(m for m, _, _ in points)


def test_summary_and_trials_csv(study_report):
    study = optuna.load_study(study_name="t", storage=study_report["storage"])
    summary = json.loads((study_report["out"] / "summary.json").read_text())
    assert summary["trials"] == len(study.trials) == 4
    assert summary["best_value"] == study.best_value and summary["best_params"] == study.best_params
    assert summary["states"]["complete"] == 4
    assert summary["importance"]["evaluator"].startswith("PED-ANOVA")
    df = pd.read_csv(study_report["out"] / "trials.csv")
    assert len(df) == 4 and list(df["number"]) == [0, 1, 2, 3]
    for col in ("value", "state", "duration_s", "params_lr", "params_num_layers", "user_attrs_best_val_acc",
                "user_attrs_param_count", "user_attrs_curves"):
        assert col in df.columns, col
    assert json.loads(df["user_attrs_curves"][0])["val_acc"]  # nested attrs are JSON
    assert df["value"].max() == pytest.approx(study.best_value)


def test_best_json_test_accuracy_equals_load_model(study_report):
    from hpsearch import load_dataset, load_model

    best = json.loads((study_report["out"] / "best.json").read_text())
    study = optuna.load_study(study_name="t", storage=study_report["storage"])
    assert best["trial"] == study.best_trial.number and best["params"] == study.best_params
    assert best["trained_on"] == "train" and best["seed"] == study.best_trial.user_attrs["seed"]
    # same seed, same data, same code: the retrained model is the trial's model
    assert best["reproduced_study_value"] and best["validation_accuracy"] == pytest.approx(study.best_value, abs=1e-6)
    assert set(best["versions"]) >= {"hpsearch", "torch", "optuna", "python"}
    assert [c["class"] for c in best["per_class"]] == best["classes"] and len(best["classes"]) == 10
    for c in best["per_class"]:
        assert 0 <= c["precision"] <= 1 and 0 <= c["recall"] <= 1 and 0 <= c["f1"] <= 1 and c["support"] == 1000

    a = study.user_attrs
    assert "space" not in a and "dataset_info" not in a  # long values are system attributes: a short table
    data_dir = study._storage.get_study_system_attrs(study._study_id)["hpsearch:data_dir"]
    data = load_dataset(a["dataset"], data_dir, "cpu", a["val_fraction"], a["subset"], a["seed"])
    model = load_model(study_report["out"] / "best_model.pt")
    assert not model.training
    with torch.no_grad():
        pred = model(data.test_x.view(-1, 1, 28, 28)).argmax(-1)
    correct = int((pred == data.test_y).sum())
    assert best["test_correct"] == correct and best["test_total"] == len(data.test_y)
    assert best["test_accuracy"] == correct / len(data.test_y)
    assert sum(sum(row) for row in best["confusion_matrix"]) == 10000
    assert sum(best["confusion_matrix"][i][i] for i in range(10)) == correct


def test_checkpoint_is_weights_only_and_stored_as_artifact(study_report):
    from hpsearch.report import artifact_dir, find_study_checkpoint, write_report

    path = study_report["out"] / "best_model.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "hpsearch-checkpoint" and ckpt["version"] == 1
    assert ckpt["spec"]["num_layers"] >= 1 and ckpt["classes"][0] == "T-shirt/top"
    assert ckpt["meta"]["trial"] == json.loads((study_report["out"] / "best.json").read_text())["trial"]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic: no temp files left

    storage = study_report["storage"]
    study = optuna.load_study(study_name="t", storage=storage)
    metas = optuna.artifacts.get_all_artifact_meta(study)
    # the models the search kept as trials finished, and the report's retrained one, the newest
    made_by = {m.artifact_id: torch.load(artifact_dir(storage) / m.artifact_id, weights_only=True)["meta"]["trained_by"]
               for m in metas}
    assert list(made_by.values()).count("report") == 1 and len(made_by) >= 2, made_by
    (report_id,) = [artifact_id for artifact_id, by in made_by.items() if by == "report"]
    assert {m.filename for m in metas if m.artifact_id == report_id} == {f"best_model_trial{study.best_trial.number}.pt"}
    stored = artifact_dir(storage) / report_id
    assert stored.parent == study_report["tmp"] / "studies" / "artifacts"
    assert stored.read_bytes() == path.read_bytes()
    assert find_study_checkpoint("t", storage) == stored

    # a second report of the unchanged study reuses the artifact, and --no-retrain writes no model
    again = write_report("t", storage, study_report["tmp"] / "again", retrain=True)
    assert len(optuna.artifacts.get_all_artifact_meta(study)) == len(metas)
    assert json.loads((again.parent / "best.json").read_text())["artifact"]["reused"] is True
    light = write_report("t", storage, study_report["tmp"] / "light", retrain=False)
    assert light.is_file() and not (light.parent / "best.json").exists() and not (light.parent / "best_model.pt").exists()


def test_report_cli_and_running_study(study_report, monkeypatch, capsys, tmp_path):
    """The CLI writes results/<study>/ by default; a study with a running trial can be reported."""
    storage = f"sqlite:///{tmp_path}/copy.db"
    copy_db(study_report["tmp"] / "studies" / "s.db", tmp_path / "copy.db")
    study = optuna.load_study(study_name="t", storage=storage)
    running = study.ask()  # another worker is busy with it
    running.report(0.5, 1)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["report", "--storage", storage, "--no-retrain"], monkeypatch, capsys)
    assert code == 0, err
    assert "results/t/index.html" in out
    assert (tmp_path / "results" / "t" / "index.html").is_file()
    assert (tmp_path / "results" / "t" / "charts" / "intermediate.html").is_file()
    assert study.trials[-1].state == TrialState.RUNNING  # the report only read it


def test_report_bad_studies(tmp_path, monkeypatch, capsys):
    storage = f"sqlite:///{tmp_path}/s.db"
    code, _, err = cli(["report", "--storage", storage], monkeypatch, capsys)
    assert_one_line_error(code, err, "no study storage")
    assert not (tmp_path / "s.db").exists()  # reading never creates a database

    optuna.create_study(study_name="empty", storage=storage, direction="maximize")
    code, _, err = cli(["report", "--storage", storage, "--study", "missing"], monkeypatch, capsys)
    assert_one_line_error(code, err, "no study 'missing'", "empty")
    code, _, err = cli(["report", "--storage", storage, "--study", "empty"], monkeypatch, capsys)
    assert_one_line_error(code, err, "has no trials yet")

    failed = optuna.create_study(study_name="failed", storage=storage, direction="maximize")
    failed.set_user_attr("dataset", "fashion-mnist")  # an hpsearch study (others' studies are refused)
    for _ in range(2):
        failed.tell(failed.ask(), state=TrialState.FAIL)
    code, _, err = cli(["report", "--storage", storage, "--study", "failed"], monkeypatch, capsys)
    assert_one_line_error(code, err, "only failed trials")
    code, _, err = cli(["report", "--storage", storage], monkeypatch, capsys)
    assert_one_line_error(code, err, "holds 2 studies", "--study")
    code, _, err = cli(["report", "--storage", storage, "--study", "../x"], monkeypatch, capsys)
    assert_one_line_error(code, err, "invalid study name")


def test_report_error_through_the_installed_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpsearch", "report", "--storage", f"sqlite:///{tmp_path}/none.db"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no study storage" in proc.stderr


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_index_renders_in_headless_chromium(study_report, tmp_path):
    """Open index.html offline in Chromium: every chart is drawn (plotly's SVGs are in the DOM).
    Skips without Chromium, except under CI=true (.ci/run installs it): there it fails."""
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but no chromium on PATH: .ci/run installs Debian's chromium for this test")
        pytest.skip("no headless Chromium here (apt-get install chromium)")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    url = study_report["index"].as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    drawn = re.findall(r'<div id="chart-([a-z_]+)"[^>]*class="[^"]*js-plotly-plot', dom)
    assert set(drawn) == set(CHARTS), drawn
    assert dom.count('class="main-svg"') >= len(CHARTS)


def test_tiny_studies(tmp_path):
    """A study with one complete trial and few attributes: charts that need more trials say so.
    (Studies hpsearch did not make are refused: tests/test_foreign.py.)"""
    from hpsearch.errors import HPSearchError
    from hpsearch.report import write_report

    storage = f"sqlite:///{tmp_path}/other.db"
    study = optuna.create_study(study_name="other", storage=storage, direction="maximize")
    study.set_user_attr("dataset", "fashion-mnist")
    study.enqueue_trial({"lr": 0.01, "layer_size": 64})
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True) + t.suggest_int("layer_size", 32, 256) / 1e4,
                   n_trials=1)
    index = write_report(None, storage, tmp_path / "out", retrain=False)  # the storage's only study
    page = index.read_text()
    assert 'id="chart-history"' in page and 'id="chart-importance"' not in page
    assert "not available: needs at least 2 complete trials" in page
    with pytest.raises(HPSearchError, match="unknown importance evaluator"):
        write_report("other", storage, tmp_path / "out3", retrain=False, importance="anova")
    try:  # Optuna's fANOVA fits a scikit-learn forest: without it, a one-line error says so
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(HPSearchError, match="needs scikit-learn"):
            write_report("other", storage, tmp_path / "out3", retrain=False, importance="fanova")
    else:
        assert write_report("other", storage, tmp_path / "out3", retrain=False, importance="fanova").is_file()


def test_study_from_another_machine(study_report, tmp_path):
    """The study's data directory does not exist here: the dataset is looked for in the usual places."""
    from hpsearch.report import write_report

    copy_db(study_report["tmp"] / "studies" / "s.db", tmp_path / "moved.db")
    storage = f"sqlite:///{tmp_path}/moved.db"
    moved = optuna.load_study(study_name="t", storage=storage)
    moved._storage.set_study_system_attr(moved._study_id, "hpsearch:data_dir", "/elsewhere/fashion-mnist")
    logs = []
    index = write_report("t", storage, tmp_path / "out", retrain=True, artifact=False, log=logs.append)
    moved = json.loads((index.parent / "best.json").read_text())
    original = json.loads((study_report["out"] / "best.json").read_text())
    assert any("/elsewhere/fashion-mnist is not here" in line for line in logs)
    assert moved["test_accuracy"] == original["test_accuracy"] and moved["artifact"] is None


def _copy_report(study_report, tmp_path):
    """A copy of the fixture's study and of its report folder, to change without disturbing others."""
    copy_db(study_report["tmp"] / "studies" / "s.db", tmp_path / "copy.db")
    shutil.copytree(study_report["out"], tmp_path / "out")
    return f"sqlite:///{tmp_path}/copy.db", tmp_path / "out"


def test_report_reuses_the_best_model_until_the_best_trial_changes(study_report, tmp_path, monkeypatch, capsys):
    """An unchanged study: the checkpoint is reused (not retrained), and the page still has its
    test results; --retrain retrains it; a new best trial is retrained without asking."""
    storage, out = _copy_report(study_report, tmp_path)
    ckpt = out / "best_model.pt"
    before, mtime = ckpt.read_bytes(), ckpt.stat().st_mtime_ns
    best = json.loads((out / "best.json").read_text())
    (out / "charts" / "plotly.min.js").write_text("old copy")  # as older reports left it
    code, text, err = cli(["report", "--storage", storage, "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert (f"reusing best_model.pt of trial {best['trial']} (same config); --retrain to train it again"
            in text.replace("\n", " "))
    assert "retraining" not in text
    assert ckpt.read_bytes() == before and ckpt.stat().st_mtime_ns == mtime
    again = json.loads((out / "best.json").read_text())
    assert again["test_accuracy"] == best["test_accuracy"] and again["created"] == best["created"]
    page = (out / "index.html").read_text()
    for chart in ("confusion_matrix", "misclassified", "retrain_curves", "samples"):
        assert f'id="chart-{chart}"' in page, chart
    assert "test accuracy" in page and f"{best['test_accuracy']:.4f}" in text
    assert_one_plotly_js(out)

    code, text, err = cli(["report", "--storage", storage, "--out", str(out), "--retrain"], monkeypatch, capsys)
    assert code == 0, err
    assert "reusing" not in text and f"retraining trial {best['trial']}" in text
    assert ckpt.stat().st_mtime_ns != mtime
    # --device defaults to auto, as for `run`
    assert json.loads((out / "best.json").read_text())["device"] == ("cuda" if torch.cuda.is_available() else "cpu")

    study = optuna.load_study(study_name="t", storage=storage)
    old = study.best_trial
    attrs = {**old.user_attrs, "config": {**old.user_attrs["config"], "epochs": 1}}
    study.add_trial(optuna.trial.create_trial(params=old.params, distributions=old.distributions, value=0.99,
                                              user_attrs=attrs))
    logs = []
    from hpsearch.report import write_report

    write_report("t", storage, out, log=logs.append)
    new = json.loads((out / "best.json").read_text())
    assert new["trial"] == 4 and new["epochs"] == 1
    assert any(f"it is of trial {best['trial']}, the best trial is now 4" in line for line in logs)
    assert any(line.startswith("retraining trial 4") for line in logs), logs


def test_a_changed_or_incomplete_best_json_is_retrained(study_report, tmp_path):
    from hpsearch.report import write_report

    storage, out = _copy_report(study_report, tmp_path)
    best = json.loads((out / "best.json").read_text())
    del best["confusion_matrix"]  # e.g. written by an older hpsearch
    (out / "best.json").write_text(json.dumps(best))
    logs = []
    write_report("t", storage, out, log=logs.append)
    assert any("best.json lacks confusion_matrix" in line for line in logs), logs
    assert "confusion_matrix" in json.loads((out / "best.json").read_text())

    best = json.loads((out / "best.json").read_text())
    best["retrain_key"]["trainer"] = -1  # made by another trainer
    (out / "best.json").write_text(json.dumps(best))
    logs = []
    write_report("t", storage, out, log=logs.append)
    assert any("its trainer changed" in line for line in logs), logs


def test_importance_from_few_trials_says_it_is_rough(study_report, tmp_path):
    from hpsearch.report import write_report

    page = study_report["index"].read_text()
    assert "from 4 complete trials; fewer than 20: treat as rough" in page
    assert json.loads((study_report["out"] / "summary.json").read_text())["importance"]["complete_trials"] == 4

    storage = f"sqlite:///{tmp_path}/many.db"
    study = optuna.create_study(study_name="many", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("dataset", "fashion-mnist")  # reported as an hpsearch study (no retraining here)
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True) + t.suggest_int("layer_size", 32, 256) / 1e4,
                   n_trials=20)
    page = write_report("many", storage, tmp_path / "out", retrain=False).read_text()
    assert "from 20 complete trials." in page and "treat as rough" not in page


def _row(number, state, curve, value=None, params=1000):
    from hpsearch.study.schema import TrialRow

    return TrialRow(number=number, state=state, value=value, params={"lr": 0.01},
                    intermediate={e + 1: v for e, v in enumerate(curve)}, attrs={"param_count": params})


def test_accuracy_axes_fit_the_good_trials():
    """A few diverged trials at 0.1 do not squash the others into a line at the top."""
    from hpsearch.report.figures import learning_curves_figure, size_figure

    good = [_row(i, "COMPLETE", [v - 0.05, v], v, 1000 * (i + 1)) for i, v in enumerate((0.80, 0.82, 0.84, 0.85, 0.86, 0.88))]
    best = good[-1]
    assert learning_curves_figure(good, best).layout.yaxis.range is None  # nothing diverged: autoscale
    assert size_figure(good, best).layout.yaxis.range is None
    diverged = [_row(6, "PRUNED", [0.1, 0.1], None), _row(7, "COMPLETE", [0.12, 0.1], 0.1),
                _row(8, "PRUNED", [0.1], None)]
    diverged[0].attrs["best_val_acc"] = 0.1
    trials = good + diverged
    for fig in (learning_curves_figure(trials, best), size_figure(trials, best)):
        low, high = fig.layout.yaxis.range
        assert 0.12 < low <= 0.80 and 0.88 < high <= 0.9
        assert "double-click to see all" in fig.layout.annotations[-1].text
    assert "3 trials entirely below" in learning_curves_figure(trials, best).layout.annotations[-1].text

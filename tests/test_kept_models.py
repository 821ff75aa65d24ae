"""The search keeps the models of its best trial and best start; report, export and predict use
them without training, and retrain when a kept model is missing, damaged or not the trial's."""

import json
import math
import shutil

import optuna
import pytest
import torch

from conftest import cli, make_idx_dir
from hpsearch.errors import HPSearchError
from test_report import copy_db
from test_starts import SPACE

# starts that learn slowly (SGD at lr 1e-4), so a sampled trial wins
SLOW_STARTS = ("[[start]]\nlr = 1e-4\nlayer_size = 16\noptimizer = 'sgd'\n"
               "[[start]]\nlr = 2e-4\nlayer_size = 16\noptimizer = 'sgd'\n")


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    from hpsearch.config import RunSettings
    from hpsearch.search import run_study

    tmp = tmp_path_factory.mktemp("kept")
    data = make_idx_dir(tmp / "data", n_train=300)
    space = tmp / "space.toml"
    space.write_text(SPACE + SLOW_STARTS)
    url = f"sqlite:///{tmp}/studies/s.db"
    run_study(RunSettings(trials=6, study="s", storage=url, dataset="idx", data_dir=str(data), space=str(space),
                          epochs=2, device="cpu", pruner="none", sampler="random"))
    study = optuna.load_study(study_name="s", storage=url)
    starts = [t for t in study.trials if t.user_attrs.get("hpsearch:start") is not None]
    best_start = max(starts, key=lambda t: t.value)
    assert study.best_trial.number not in {t.number for t in starts}, "a start won: the tests need a sampled trial"
    return {"tmp": tmp, "data": data, "url": url, "study": study, "best_start": best_start}


def _kept_files(url, study) -> dict[int, dict]:
    """trial number -> the meta of each model the search kept (last one per trial)."""
    from hpsearch.study import artifact_dir

    kept = {}
    for meta in optuna.artifacts.get_all_artifact_meta(study):
        ckpt = torch.load(artifact_dir(url) / meta.artifact_id, weights_only=True)
        if ckpt["meta"].get("trained_by") == "search":
            kept[ckpt["meta"]["trial"]] = ckpt["meta"]
            assert meta.filename == f"best_model_trial{ckpt['meta']['trial']}.pt"
    return kept


def test_the_search_keeps_each_new_best_trial_and_best_start(kept):
    study = kept["study"]
    expected, best, best_start = set(), -math.inf, -math.inf
    for t in sorted((t for t in study.trials if t.value is not None), key=lambda t: t.datetime_complete):
        is_start = t.user_attrs.get("hpsearch:start") is not None
        if t.value > best or (is_start and t.value > best_start):
            expected.add(t.number)
        best = max(best, t.value)
        best_start = max(best_start, t.value) if is_start else best_start
    kept_files = _kept_files(kept["url"], study)
    assert set(kept_files) == expected
    assert {study.best_trial.number, kept["best_start"].number} <= expected
    meta = kept_files[study.best_trial.number]
    assert meta["validation_accuracy"] == study.best_value and meta["config"] == study.best_trial.user_attrs["config"]
    assert len(meta["history"]) == 2 and meta["history"][-1]["val_acc"] == pytest.approx(study.best_value)


def test_the_report_tests_the_kept_models_without_training_and_they_are_the_retrained_ones(kept, tmp_path):
    """On the CPU a kept model is bit for bit the one retraining gives: the report's numbers do not
    change, only the time spent."""
    from hpsearch.report import write_report

    url, data = kept["url"], str(kept["data"])
    logs = []
    write_report("s", url, tmp_path / "kept", data_dir=data, log=logs.append)
    assert not any(line.startswith(("retraining", "testing the best start beside it: retraining")) for line in logs), logs
    assert any(line.startswith(f"testing trial {kept['study'].best_trial.number}'s own model, kept by the search")
               for line in logs), logs
    best = json.loads((tmp_path / "kept" / "best.json").read_text())
    assert best["trained_by"] == "search" and best["best_start"]["trained_by"] == "search"
    assert best["reproduced_study_value"] and best["best_start"]["trial"] == kept["best_start"].number
    assert "validation accuracy (kept by the search)" in (tmp_path / "kept" / "index.html").read_text()

    write_report("s", url, tmp_path / "retrained", data_dir=data, retrain=True, artifact=False)
    again = json.loads((tmp_path / "retrained" / "best.json").read_text())
    assert again["trained_by"] == "report" and again["best_start"]["trained_by"] == "report"
    assert again["test_accuracy"] == best["test_accuracy"] and again["confusion_matrix"] == best["confusion_matrix"]
    assert again["best_start"]["test_accuracy"] == best["best_start"]["test_accuracy"]
    a, b = (torch.load(tmp_path / d / "best_model.pt", weights_only=True)["state_dict"] for d in ("kept", "retrained"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_and_predict_need_no_report_after_a_run(kept, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from hpsearch.report import find_study_checkpoint

    kept_file = find_study_checkpoint("s", kept["url"])  # no report has run: the search's own
    assert torch.load(kept_file, weights_only=True)["meta"]["trained_by"] == "search"
    out = tmp_path / "model.ts"
    code, text, err = cli(["export", "--storage", kept["url"], "--study", "s", "--format", "torchscript",
                           "--out", str(out)], monkeypatch, capsys)
    assert code == 0 and out.is_file(), err
    Image.new("L", (28, 28), 255).save(tmp_path / "white.png")
    code, text, err = cli(["predict", str(tmp_path / "white.png"), "--storage", kept["url"], "--study", "s", "--json"],
                          monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(text)[0]["label"] in [str(c) for c in range(10)]


def _study_copy(kept, tmp_path, artifacts: bool) -> str:
    """The study in `tmp_path`, with or without the artifact files beside it (as on another host)."""
    (tmp_path / "studies").mkdir()
    copy_db(kept["tmp"] / "studies" / "s.db", tmp_path / "studies" / "s.db")
    if artifacts:
        shutil.copytree(kept["tmp"] / "studies" / "artifacts", tmp_path / "studies" / "artifacts")
    return f"sqlite:///{tmp_path}/studies/s.db"


def _kept_path(url, number):
    """The file of the model the search kept for trial `number`."""
    from hpsearch.study import artifact_dir

    study = optuna.load_study(study_name="s", storage=url)
    paths = [artifact_dir(url) / m.artifact_id for m in optuna.artifacts.get_all_artifact_meta(study)
             if m.filename == f"best_model_trial{number}.pt"]
    (path,) = [p for p in paths if torch.load(p, weights_only=True)["meta"].get("trained_by") == "search"]
    return path


@pytest.mark.parametrize("damage", ["missing", "garbage", "other metadata", "other weights", "other data"])
def test_without_the_trials_own_model_the_report_retrains(kept, tmp_path, damage):
    from hpsearch.report import write_report

    url = _study_copy(kept, tmp_path, artifacts=damage != "missing")
    number = kept["study"].best_trial.number
    if damage == "garbage":
        _kept_path(url, number).write_bytes(b"not a checkpoint")
    elif damage.startswith("other"):
        path = _kept_path(url, number)
        ckpt = torch.load(path, weights_only=True)
        if damage == "other metadata":  # e.g. copied over from another trial
            ckpt["meta"]["validation_accuracy"] -= 0.01
        elif damage == "other data":  # e.g. a --data-dir with other files than the study's
            ckpt["meta"]["dataset_info"]["train"] += 1
        else:  # the metadata right, the weights not the trial's (a bug taking them out of a population)
            ckpt["state_dict"] = {k: torch.zeros_like(v) if k.endswith("weight") else v
                                  for k, v in ckpt["state_dict"].items()}
        torch.save(ckpt, path)
    logs = []
    write_report("s", url, tmp_path / "out", data_dir=str(kept["data"]), log=logs.append)
    assert any(line.startswith(f"retraining trial {number}") for line in logs), logs
    why = {"missing": f"the study records a model of trial {number} whose file is not in ",
           "garbage": "is not an hpsearch checkpoint",
           "other metadata": "its validation_accuracy differs from the study's",
           "other weights": "on the validation split it scores ",
           "other data": "it was trained on other data than the study's here"}[damage]
    prefix = (f"the study records a model of trial {number}" if damage == "missing"
              else f"not using the search's model of trial {number}: ")
    assert any(line.startswith(prefix) and why in line for line in logs), logs
    assert json.loads((tmp_path / "out" / "best.json").read_text())["trained_by"] == "report"


def test_models_kept_from_a_population_are_each_trials_own(tmp_path):
    """Members trained together (as on a GPU, here 3 at once on the CPU, padded into one group):
    each kept checkpoint, loaded and run on the validation split, gives its trial's accuracy."""
    from hpsearch.checkpoint import load_model
    from hpsearch.config import RunSettings
    from hpsearch.data import load_dataset
    from hpsearch.search import run_study

    data = make_idx_dir(tmp_path / "data", n_train=300)
    space = tmp_path / "space.toml"
    space.write_text(SPACE + SLOW_STARTS)
    url = f"sqlite:///{tmp_path}/studies/s.db"
    run_study(RunSettings(trials=6, study="s", storage=url, dataset="idx", data_dir=str(data), space=str(space),
                          epochs=2, device="cpu", pruner="none", sampler="random", population=3, grouping="batch"))
    study = optuna.load_study(study_name="s", storage=url)
    assert max(t.user_attrs["population"] for t in study.trials) > 1
    val = load_dataset("idx", str(data), "cpu", 0.1, None, 0)
    kept_files = _kept_files(url, study)
    assert study.best_trial.number in kept_files
    for number, meta in kept_files.items():
        path = _kept_path(url, number)
        with torch.no_grad():
            predicted = load_model(path)(val.val_x.view(-1, 1, *val.image_shape)).argmax(-1)
        accuracy = float((predicted == val.val_y).float().mean())
        assert accuracy == pytest.approx(study.trials[number].value, abs=1e-6) == meta["validation_accuracy"]


def test_an_artifact_folder_that_cannot_be_written_costs_the_study_nothing(tmp_path):
    """The search notes that the model was not kept and goes on; the report retrains it."""
    from hpsearch.config import RunSettings
    from hpsearch.report import write_report
    from hpsearch.search import Reporter, run_study

    class Notes(Reporter):
        def __init__(self):
            self.notes = []

        def note(self, message):
            self.notes.append(message)

    data = make_idx_dir(tmp_path / "data", n_train=300)
    space = tmp_path / "space.toml"
    space.write_text(SPACE + SLOW_STARTS)
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "artifacts").write_text("a file where the artifact folder goes")
    url = f"sqlite:///{tmp_path}/studies/s.db"
    reporter = Notes()
    summary = run_study(RunSettings(trials=3, study="s", storage=url, dataset="idx", data_dir=str(data),
                                    space=str(space), epochs=2, device="cpu", pruner="none"), reporter)
    assert summary.finished_in_study == 3
    assert any(n.startswith("trial 0's model was not kept: could not store the checkpoint as an Optuna artifact in ")
               and n.endswith("; a report retrains it") for n in reporter.notes), reporter.notes
    logs = []
    write_report("s", url, tmp_path / "out", data_dir=str(data), artifact=False, log=logs.append)
    assert any(line.startswith(f"retraining trial {summary.best_trial}") for line in logs), logs


def test_export_skips_a_half_written_or_damaged_artifact(kept, tmp_path):
    """Optuna records an artifact before writing its file: the file is written whole or not at all
    (renamed into place), and a reader skips a record whose file is absent or damaged."""
    from hpsearch.report import find_study_checkpoint
    from hpsearch.study import artifact_dir

    url = _study_copy(kept, tmp_path, artifacts=True)
    study = optuna.load_study(study_name="s", storage=url)
    number = study.best_trial.number
    good = find_study_checkpoint("s", url)
    # as a crash mid-upload leaves it: the record, no file (or only a temporary one beside it)
    study._storage.set_study_system_attr(study._study_id, "artifacts:00000000-dead", json.dumps(
        {"artifact_id": "00000000-dead", "filename": f"best_model_trial{number}.pt",
         "mimetype": "application/octet-stream", "encoding": None}))
    assert find_study_checkpoint("s", url) == good
    (artifact_dir(url) / "00000000-dead").write_bytes(b"PK\x03\x04 half a checkpoint")
    assert find_study_checkpoint("s", url) == good
    assert not list(artifact_dir(url).glob("*.tmp"))  # every upload finished its rename

    # a kept file whose metadata is not the trial's is not exported either
    ckpt = torch.load(good, weights_only=True)
    ckpt["meta"]["validation_accuracy"] -= 0.01
    torch.save(ckpt, good)
    with pytest.raises(HPSearchError, match=f"has no checkpoint of its best trial \\({number}\\) yet"):
        find_study_checkpoint("s", url, results_dir=tmp_path / "results")

"""The Python API (hpsearch.run/report/export/predict/load_study, Objective) and `hpsearch export`'s defaults.

The docstring examples and docs/api.md are run as they are written, on real Fashion-MNIST in
temporary folders: they are the first tests here. The rest reuse the docstrings' study 'demo'.
"""

import doctest
import inspect
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import optuna
import pytest

import hpsearch
from hpsearch import api
from hpsearch.errors import HPSearchError, SpaceError
from hpsearch.study.objective import Objective

from conftest import assert_one_line_error, cli

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
# In the order they build on each other: run makes the study the others use.
DOCUMENTED = (api.run, api.load_study, api.report, api.export, api.predict, Objective)


def _doctests(obj) -> list[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(obj) if t.examples]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, fashion_dir):
    """The docstring examples, run in order in one folder (sharing their names, as in a notebook)."""
    folder = tmp_path_factory.mktemp("api")
    runner, globs, out = doctest.DocTestRunner(), {}, []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        for obj in DOCUMENTED:
            for test in _doctests(obj):
                test.globs = globs
                runner.run(test, out=out.append, clear_globs=False)
    return {"folder": folder, "results": runner.summarize(verbose=False), "report": "".join(out)}


def test_docstring_examples_run(demo):
    failed, attempted = demo["results"]
    assert failed == 0, demo["report"]
    assert attempted >= 20
    for obj in DOCUMENTED:  # every API function shows a runnable example, none skipped
        assert _doctests(obj), obj.__name__
        assert "+SKIP" not in inspect.getdoc(obj), obj.__name__


def test_docs_page_runs(tmp_path, monkeypatch, capsys, fashion_dir):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    for i, block in enumerate(blocks, 1):
        exec(compile(block, f"{DOCS}: python block {i}", "exec"), names)  # noqa: S102 - our own docs
    out = capsys.readouterr().out
    for name in ("best_model.onnx", "best_model.ts", "best_model.pt", "index.html"):
        assert (tmp_path / "results" / "notebook" / name).is_file(), name
    assert 0.3 < names["result"].test_accuracy <= 1 and names["result"].study == "notebook"
    start = names["result"].best_start  # the default space's starts ran first; tested unless it is the best
    assert start is not None and start["trial"] in (0, 1)
    assert ("test_accuracy" in start) == (start["lead"] > 0)
    assert isinstance(names["study"], optuna.Study) and len(names["study"].trials) == 3
    own = names["own"]  # the user's own study: the callback saw all three trials
    assert len(own.trials) == 3 and out.count(" s/epoch)") == 3
    assert own.trials[0].params == names["objective"].space.starts[0]
    assert "of 10 right" in out and "boot.png" in out


def test_import_stays_light_and_names_are_public():
    code = ("import sys, hpsearch; hpsearch.run; hpsearch.predict; hpsearch.api.export_plan; "
            "print(' '.join(m for m in ('torch', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
    for name in ("run", "report", "export", "predict", "load_study", "Objective", "load_space", "Report",
                 "load_model", "HPSearchError"):
        assert name in dir(hpsearch) and callable(getattr(hpsearch, name)), name


def test_report_and_export_are_functions_and_modules_in_any_import_order():
    code = ("import hpsearch.export, hpsearch.report\n"
            "from hpsearch.report import write_report\n"
            "from hpsearch.export import export_model\n"
            "import hpsearch\n"
            "assert callable(hpsearch.report) and callable(hpsearch.export)\n"
            "assert hpsearch.report.write_report is write_report and hpsearch.export.export_model is export_model\n"
            "try:\n    hpsearch.export(format='tflite')\nexcept hpsearch.HPSearchError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "unknown export format 'tflite'" in out.stdout


def test_run_has_the_cli_options_and_defaults():
    import typer.main

    from hpsearch import cli as cli_module

    command = typer.main.get_command(cli_module.app).commands["run"]
    cli_defaults = {p.name: p.default for p in command.params}
    params = inspect.signature(api.run).parameters
    ours = {name: getattr(p.default, "value", p.default) for name, p in params.items() if name != "progress"}
    assert ours == cli_defaults
    assert all(p.kind == p.KEYWORD_ONLY for p in params.values())
    from hpsearch.study import IDENTITY

    assert set(api.IDENTITY_OPTIONS) == set(cli_module.IDENTITY_FLAGS) == set(IDENTITY)


def test_run_continues_shows_progress_and_refuses_other_settings(demo, monkeypatch, capsys):
    monkeypatch.chdir(demo["folder"])
    study = hpsearch.run(study="demo", trials=4)  # the docstrings left 4: nothing to train
    assert isinstance(study, optuna.Study) and len(study.trials) == 4
    out = capsys.readouterr().out
    assert "already holds 4 finished trials" in out and "done" in out  # RichReporter spoke
    with pytest.raises(HPSearchError, match=r"created with --epochs 2") as exc:
        hpsearch.run(study="demo", trials=5, epochs=3, progress=False)
    assert "\n" not in str(exc.value)
    assert len(hpsearch.load_study().trials) == 4


@pytest.mark.parametrize("options, words", [
    ({"trials": 0}, "--trials must be at least 1"),
    ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
    ({"workers": 0}, "--workers must be between 1"),
    ({"study": "../x"}, "invalid study name"),
])
def test_run_errors_are_one_line_and_write_nothing(options, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HPSearchError, match=re.escape(words)) as exc:
        hpsearch.run(progress=False, **options)
    assert "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_run_says_what_an_interrupt_or_failed_workers_left(tmp_path, monkeypatch, capsys):
    def interrupted(settings, reporter):
        exc = KeyboardInterrupt()
        exc.message = "interrupted: trial 3 marked failed and queued to run again"
        raise exc

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("hpsearch.search.run_study", interrupted)
    with pytest.raises(KeyboardInterrupt):  # a notebook's stop button stops the cell
        hpsearch.run(workers=1, progress=False)
    assert "trial 3 marked failed and queued" in capsys.readouterr().err

    calls = []
    monkeypatch.setattr("hpsearch.workers.run_workers", lambda settings, n, **kw: calls.append(n) or 130)
    with pytest.raises(HPSearchError, match="the 2 workers stopped with exit code 130") as exc:
        hpsearch.run(workers=2, progress=False)
    assert calls == [2] and "\n" not in str(exc.value)


def test_export_plan_rules(tmp_path):
    from hpsearch.api import EXPORT_SUFFIXES, export_plan
    from hpsearch.export import FORMATS

    assert set(EXPORT_SUFFIXES) == set(FORMATS)
    ckpt = tmp_path / "model.pt"
    assert export_plan(ckpt, "onnx").out == tmp_path / "model.onnx"
    assert export_plan(ckpt, "torchscript").out == tmp_path / "model.ts"
    assert export_plan(ckpt, "pt").out == tmp_path / "model.export.pt"  # never over the checkpoint
    assert export_plan(tmp_path / "m.onnx", "onnx").out == tmp_path / "m.export.onnx"
    assert export_plan(ckpt, "onnx", tmp_path / "x.onnx").out == tmp_path / "x.onnx"
    for args, words in (((ckpt, "pt", ckpt), "is the checkpoint itself"), ((ckpt, "tflite"), "unknown export format"),
                        ((ckpt, "onnx", None, "demo"), "not both")):
        with pytest.raises(HPSearchError, match=words):
            export_plan(*args)


def test_cli_export_defaults_to_the_only_study(demo, monkeypatch, capsys):
    from hpsearch import load_model

    monkeypatch.chdir(demo["folder"])
    best = demo["folder"] / "results" / "demo" / "best_model.pt"
    before = best.read_bytes()
    code, out, err = cli(["export"], monkeypatch, capsys)
    assert code in (0, None), err
    onnx_file = Path("results/demo/best_model.onnx")
    assert f"wrote {onnx_file} (onnx" in out and onnx_file.is_file()
    onnx = pytest.importorskip("onnx")
    meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(meta["hpsearch"])["meta"]["trial"] == hpsearch.load_study().best_trial.number

    code, out, err = cli(["export", "--format", "pt"], monkeypatch, capsys)
    assert code in (0, None) and "results/demo/best_model.export.pt" in out, err
    assert best.read_bytes() == before  # the report's checkpoint is not the copy's target
    assert load_model("results/demo/best_model.export.pt").spec == load_model(best).spec

    (demo["folder"] / "mine").mkdir(exist_ok=True)
    shutil.copy(best, demo["folder"] / "mine" / "model.pt")
    code, out, err = cli(["export", "--format", "torchscript", "--checkpoint", "mine/model.pt"], monkeypatch, capsys)
    assert code in (0, None) and (demo["folder"] / "mine" / "model.ts").is_file(), err
    assert hpsearch.export() == onnx_file  # the API has the same defaults


def test_export_without_a_study_or_checkpoint_is_one_line(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["export"], monkeypatch, capsys)
    assert_one_line_error(code, err, "no study storage", "--checkpoint")

    two = f"sqlite:///{tmp_path}/two.db"
    for name in ("a", "b"):
        optuna.create_study(study_name=name, storage=two)
    code, _, err = cli(["export", "--storage", two], monkeypatch, capsys)
    assert_one_line_error(code, err, "holds 2 studies", "--study")

    (tmp_path / "copy").mkdir()  # the demo study without its report and artifacts
    with closing(sqlite3.connect(demo["folder"] / "studies" / "hpsearch.db")) as source, \
            closing(sqlite3.connect(tmp_path / "copy" / "hpsearch.db")) as target:
        source.backup(target)
    unreported = f"sqlite:///{tmp_path}/copy/hpsearch.db"
    code, _, err = cli(["export", "--format", "torchscript", "--storage", unreported], monkeypatch, capsys)
    assert_one_line_error(code, err, "no checkpoint", "hpsearch report --study demo` first")
    with pytest.raises(HPSearchError, match="hpsearch report --study demo"):
        hpsearch.export(storage=unreported)
    assert not (tmp_path / "results").exists()


def test_predict_defaults_and_forwards_options(demo, monkeypatch):
    monkeypatch.chdir(demo["folder"])
    (one,) = hpsearch.predict("boot.png")  # the only study's best model
    assert one.label in hpsearch.load_dataset("fashion-mnist", subset=100).classes
    two = hpsearch.predict(["boot.png", Path("boot.png")], invert=False, top=4)
    assert [len(p.top) for p in two] == [4, 4]
    with pytest.raises(HPSearchError, match="unknown predict option 'bogus'"):
        hpsearch.predict("boot.png", bogus=1)

    seen = {}

    def predict_images(paths, checkpoint, invert=None, resize="auto", top=3, brand_new=None):
        seen.update(paths=paths, checkpoint=checkpoint, brand_new=brand_new)
        return ["ok"]

    monkeypatch.setattr("hpsearch.export.predict_images", predict_images)  # options change there: passed on
    assert hpsearch.predict("boot.png", brand_new=7, checkpoint="results/demo/best_model.pt") == ["ok"]
    assert seen == {"paths": ["boot.png"], "checkpoint": Path("results/demo/best_model.pt"), "brand_new": 7}


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_objective_prunes_reports_and_matches_the_trainer(fashion_dir, monkeypatch):
    from hpsearch import data as data_module
    from hpsearch import TrainConfig, train_one

    loads = []
    real_load = data_module.load_dataset
    monkeypatch.setattr(data_module, "load_dataset", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    objective = hpsearch.Objective(subset=600, epochs=2, seed=3, device="cpu", space="mlp")
    assert loads == []  # lazily, on the first call
    params = objective.space.starts[1]

    pruned = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    pruned.enqueue_trial(params)
    pruned.optimize(objective, n_trials=1)
    (trial,) = pruned.trials
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    assert trial.user_attrs["epochs_run"] == 1 and trial.user_attrs["stop_reason"] == "pruned"

    complete = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    complete.enqueue_trial(params)
    complete.enqueue_trial(params)
    complete.optimize(objective, n_trials=2)
    first, second = complete.trials
    assert loads and len(loads) == 1  # one dataset for all calls
    assert first.state.name == "COMPLETE" and first.value == first.intermediate_values[2]  # the last epoch's
    seed = (3 * 1_000_003 + first.number) % 2**31  # hpsearch run's per-trial seed
    assert first.user_attrs["seed"] == seed and second.user_attrs["seed"] == seed + 1
    assert first.user_attrs["config"]["lr"] == params["lr"] and first.user_attrs["seconds_per_epoch"] > 0
    alone = train_one(TrainConfig.from_params({**objective.space.fixed, **params}, epochs=2, seed=seed), objective.data)
    assert alone.final.val_acc == first.value


def test_objective_value_is_the_last_epoch_as_in_hpsearch_run(fashion_dir, monkeypatch):
    from hpsearch.train import EpochResult, TrainResult

    def train_one(config, data, on_epoch, **kwargs):  # a curve that peaks before its end
        history = [EpochResult(0, epoch, 0.5, 0.8, 0.6, acc, 0.1, 1, finished=epoch == 3)
                   for epoch, acc in ((1, 0.7), (2, 0.8), (3, 0.6))]
        for result in history:
            on_epoch(result)
        return TrainResult(None, history)

    monkeypatch.setattr("hpsearch.train.train_one", train_one)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    study.optimize(hpsearch.Objective(subset=600, epochs=3, device="cpu"), n_trials=1)
    (trial,) = study.trials
    assert trial.value == 0.6 and trial.intermediate_values == {1: 0.7, 2: 0.8, 3: 0.6}
    attrs = trial.user_attrs
    assert (attrs["best_val_acc"], attrs["best_epoch"], attrs["epochs_run"]) == (0.8, 2, 3)
    assert attrs["stop_reason"] == "completed"


def test_objective_prunes_a_diverging_trial_with_its_reason(fashion_dir):
    from hpsearch.space import parse_space

    space = parse_space('[params.layer_size]\ntype = "int"\nlow = 64\nhigh = 64\n'
                        '[fixed]\nlr = 10.0\noptimizer = "sgd"\nmomentum = 0.9\nschedule = "constant"\n', "boom.toml")
    study = optuna.create_study(direction="maximize")
    study.optimize(hpsearch.Objective(subset=600, epochs=2, space=space, device="cpu"), n_trials=1)
    (trial,) = study.trials
    assert trial.state.name == "PRUNED" and "loss" in trial.user_attrs["stop_reason"]


@pytest.mark.parametrize("options, error, words", [
    ({"epochs": 0}, HPSearchError, "--epochs must be at least 1"),
    ({"dataset": "cifar"}, HPSearchError, "unknown dataset"),
    ({"space": "missing.toml"}, SpaceError, "cannot read search space missing.toml"),
    ({"device": "tpu"}, HPSearchError, "unknown device"),
])
def test_objective_errors_are_one_line(options, error, words):
    with pytest.raises(error, match=re.escape(words)) as exc:
        hpsearch.Objective(**options)
    assert "\n" not in str(exc.value)


def test_a_study_of_objective_trials_can_be_reported(fashion_dir, tmp_path, monkeypatch):
    """Objective marks the user's study with what it measures, so `hpsearch report` reads it."""
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path}/own.db"
    study = optuna.create_study(study_name="own", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    objective = hpsearch.Objective(subset=600, epochs=1, device="cpu", data_dir=str(fashion_dir))
    study.enqueue_trial(objective.space.starts[0])  # a known-good configuration: a meaningful test accuracy
    study.optimize(objective, n_trials=2)
    assert study.user_attrs["dataset"] == "fashion-mnist" and study.user_attrs["subset"] == 600
    assert study.metric_names == ["val_accuracy"]
    result = hpsearch.report(study="own", storage=storage, artifact=False, log=lambda message: None)
    assert result.best_trial == study.best_trial.number and 0.5 < result.test_accuracy <= 1

"""Starting configurations ([[start]] in a space file): validated, run first, recorded, reported."""

import re

import optuna
import pytest

from conftest import make_idx_dir
from hpsearch.errors import SpaceError
from hpsearch.space import load_space, parse_space

SPACE = """
[params.lr]
type = "float"
low = 1e-4
high = 1e-1
log = true
[params.layer_size]
type = "int"
low = 16
high = 64
step = 16
[params.optimizer]
type = "categorical"
choices = ["adamw", "sgd"]
[fixed]
num_layers = 2
batch_size = 64
"""
START_1 = "[[start]]\nlr = 1e-3\nlayer_size = 32\noptimizer = 'adamw'\n"
START_2 = "[[start]]\nlr = 1e-2\nlayer_size = 64\noptimizer = 'sgd'\n"


def test_starts_are_parsed_in_order_and_not_part_of_the_study_identity():
    space = parse_space(SPACE + START_1 + START_2)
    assert space.starts == ({"lr": 1e-3, "layer_size": 32, "optimizer": "adamw"},
                            {"lr": 1e-2, "layer_size": 64, "optimizer": "sgd"})
    assert space.to_dict() == parse_space(SPACE).to_dict()


@pytest.mark.parametrize("start, message", [
    ("lr = 1e-3\nlayer_size = 32\noptimizer = 'adamw'\nnum_layers = 3\n", "num_layers is not a sampled parameter"),
    ("lr = 1e-3\nlayer_size = 32\n", "sets no value for optimizer"),
    ("lr = 0.5\nlayer_size = 32\noptimizer = 'adamw'\n", "lr = 0.5 is outside [0.0001, 0.1]"),
    ("lr = 1e-3\nlayer_size = 40\noptimizer = 'adamw'\n", "not on the grid of step 16"),
    ("lr = 1e-3\nlayer_size = 32\noptimizer = 'sgdw'\n", "optimizer = 'sgdw' is not one of"),
    ("lr = 1e-3\nlayer_size = 32.5\noptimizer = 'adamw'\n", "layer_size must be int"),
])
def test_a_bad_start_is_one_clear_error(start, message):
    with pytest.raises(SpaceError, match=re.escape(message)):
        parse_space(SPACE + "[[start]]\n" + start, "s.toml")
    with pytest.raises(SpaceError, match="the same configuration"):
        parse_space(SPACE + START_1 + START_1)


def test_the_shipped_space_starts_from_known_good_configurations():
    starts = load_space(None).starts
    assert 2 <= len(starts) <= 4
    assert {"num_layers": 3, "layer_size": 512, "activation": "relu", "weight_decay": 1e-2,  # the modern default
            "lr": 1e-3, "batch_size": 128, "dropout": 0.2} in starts


def _run(tmp_path, data, trials, start=True, study="s", **settings):
    from hpsearch.config import RunSettings
    from hpsearch.search import run_study

    space = tmp_path / "space.toml"
    space.write_text(SPACE + START_1 + START_2)
    url = f"sqlite:///{tmp_path}/s.db"
    run_study(RunSettings(trials=trials, study=study, storage=url, dataset="idx", data_dir=str(data),
                          space=str(space), epochs=2, device="cpu", pruner="none", start=start, **settings))
    return optuna.load_study(study_name=study, storage=url).trials


def test_a_new_study_runs_its_starts_first_and_records_them(tmp_path):
    data = make_idx_dir(tmp_path / "data")
    trials = _run(tmp_path, data, trials=3)
    assert [t.params for t in trials[:2]] == list(parse_space(SPACE + START_1 + START_2).starts)
    assert [t.user_attrs.get("hpsearch:start") for t in trials] == [1, 2, None]
    assert all(t.state.name == "COMPLETE" for t in trials)
    trials = _run(tmp_path, data, trials=4)  # continuing: the starts are not queued again
    assert len(trials) == 4 and [t.user_attrs.get("hpsearch:start") for t in trials] == [1, 2, None, None]

    from hpsearch.study import open_view, study_summary

    summary = study_summary(open_view(f"sqlite:///{tmp_path}/s.db", "s"))
    best_start = max(trials[:2], key=lambda t: t.value)
    assert summary["best_start"]["trial"] == best_start.number and summary["best_start"]["value"] == best_start.value


def test_no_start_samples_from_the_first_trial(tmp_path):
    data = make_idx_dir(tmp_path / "data")
    trials = _run(tmp_path, data, trials=2, start=False, study="n")
    assert all("hpsearch:start" not in t.user_attrs for t in trials)


def test_the_sampler_and_pruner_are_recorded_and_used(tmp_path):
    data = make_idx_dir(tmp_path / "data")
    _run(tmp_path, data, trials=1, start=False, study="r", sampler="random")
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path}/s.db")
    assert (study.user_attrs["sampler"], study.user_attrs["pruner"]) == ("random", "none")
    _run(tmp_path, data, trials=2, start=False, study="r")  # a later run may sample otherwise
    assert study.user_attrs["sampler"] == "tpe"
    from hpsearch.study.session import make_sampler

    assert isinstance(make_sampler("random", 0), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler("auto", 0), optuna.samplers.TPESampler)
    # with starts, TPE models after 4 random trials more; without, after Optuna's 10
    assert make_sampler("tpe", 0, starts=2)._n_startup_trials == 6
    assert make_sampler("tpe", 0)._n_startup_trials == 10
    # the Gaussian process waits as long beyond the starts (in COMPLETE trials: its own rule)
    pytest.importorskip("scipy")
    assert isinstance(make_sampler("gp", 0, starts=3), optuna.samplers.GPSampler)
    assert make_sampler("gp", 0, starts=3)._n_startup_trials == 7


def test_pruning_starts_after_the_starting_configurations():
    from hpsearch.study import make_pruner

    assert make_pruner("median", 20, starts=3)._n_startup_trials == 3
    assert make_pruner("median", 20)._n_startup_trials == 1  # without starts only the first trial runs unpruned


def test_halving_prunes_a_trial_behind_at_its_first_rung():
    """--pruner halving: rungs at epochs 2, 6, 18; at epoch 2 a trial goes on only while it is in
    the best third of those that reached it (the first trial at a rung is alone, so it goes on)."""
    from hpsearch.study import make_pruner

    study = optuna.create_study(direction="maximize", pruner=make_pruner("halving", 20))
    verdicts = []
    for accuracy in (0.9, 0.8, 0.7, 0.95):
        trial = study.ask()
        for epoch in (1, 2):
            trial.report(accuracy, epoch)
        verdicts.append(trial.should_prune())
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if verdicts[-1] else None,
                   values=None if verdicts[-1] else accuracy)
    assert verdicts == [False, True, True, False]


def _settings(tmp_path, data, **kw):
    from hpsearch.config import RunSettings

    space = tmp_path / "space.toml"
    space.write_text(SPACE + START_1 + START_2)
    return RunSettings(**{"trials": 3, "study": "x", "storage": f"sqlite:///{tmp_path}/x.db", "dataset": "idx",
                          "data_dir": str(data), "space": str(space), "epochs": 2, "device": "cpu", **kw})


def test_a_retried_or_surplus_start_stays_a_start_and_copies_from_a_race_are_dropped(tmp_path):
    from hpsearch.space import load_space
    from hpsearch.study import enqueue_retry, open_study
    from hpsearch.study.session import _config_for, _drop_duplicate_starts, _give_up_surplus

    settings = _settings(tmp_path, tmp_path)
    space = load_space(settings.space)
    study = open_study(settings, space)
    first = study.ask()
    _config_for(first, space, 2, 0)  # as the session does right after asking: the start's values
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    number = enqueue_retry(study, study.trials[first.number], 3)
    retry = study.trials[number]
    assert retry.user_attrs["hpsearch:start"] == 1 and retry.user_attrs["retry_of"] == first.number
    surplus = study.ask()  # start 2, given up as a surplus trial on a server: queued again, still a start
    _config_for(surplus, space, 2, 0)
    _give_up_surplus(study, surplus)
    assert study.trials[-1].state.name == "WAITING" and study.trials[-1].user_attrs["hpsearch:start"] == 2
    # a second worker creating the same server study queued the starts again: those copies go
    for index, params in enumerate(space.starts, 1):
        study.enqueue_trial(params, user_attrs={"hpsearch:start": index})
    _drop_duplicate_starts(study)
    waiting = [t for t in study.trials if t.state.name == "WAITING"]
    assert sorted(t.user_attrs["hpsearch:start"] for t in waiting) == [1, 2]
    assert sum(t.user_attrs.get("stop_reason") == "duplicate start" for t in study.trials) == 2


def test_pruning_waits_for_the_starts_the_study_really_has(tmp_path):
    from hpsearch.space import load_space
    from hpsearch.study import open_study

    space = load_space(_settings(tmp_path, tmp_path).space)
    assert open_study(_settings(tmp_path, tmp_path, study="with"), space).pruner._n_startup_trials == 2
    assert open_study(_settings(tmp_path, tmp_path, study="without", start=False), space).pruner._n_startup_trials == 1


def test_a_changed_space_is_named_setting_by_setting(tmp_path):
    from hpsearch.errors import HPSearchError
    from hpsearch.space import parse_space
    from hpsearch.study import open_study

    settings = _settings(tmp_path, tmp_path)
    open_study(settings, parse_space(SPACE + START_1))
    changed = parse_space(SPACE.replace("batch_size = 64", "batch_size = 64\nschedule = 'cosine'") + START_1)
    with pytest.raises(HPSearchError, match=re.escape('another search space (fixed.schedule: absent -> "cosine")')):
        open_study(settings, changed)


def test_workers_check_the_data_before_creating_the_study(tmp_path, monkeypatch, capsys):
    from conftest import cli

    data = make_idx_dir(tmp_path / "data")
    url = f"sqlite:///{tmp_path}/w.db"
    code, _, err = cli(["run", "--workers", "2", "--dataset", "idx", "--data-dir", str(data), "--subset", "999999",
                        "--storage", url, "--study", "w", "--device", "cpu"], monkeypatch, capsys)
    assert code == 2 and "subset" in err
    assert not (tmp_path / "w.db").exists() or optuna.get_all_study_names(url) == []


def test_a_start_that_died_before_sampling_is_retried_with_its_values(tmp_path):
    from hpsearch.space import load_space
    from hpsearch.study import enqueue_retry, open_study
    from hpsearch.study.session import _config_for

    settings = _settings(tmp_path, tmp_path)
    space = load_space(settings.space)
    study = open_study(settings, space)
    died = study.ask()  # the worker was killed right after asking: no parameter sampled yet
    study.tell(died, state=optuna.trial.TrialState.FAIL)
    assert study.trials[died.number].params == {}
    number = enqueue_retry(study, study.trials[died.number], 3)
    assert number is not None and study.trials[number].user_attrs["hpsearch:start"] == 1
    trials = [study.ask() for _ in range(2)]  # start 2 was queued before the retry
    retry = next(t for t in trials if t.number == number)
    config = _config_for(retry, space, 2, 0)
    assert (config.lr, config.layer_size, config.optimizer) == (1e-3, 32, "adamw")


def test_the_report_tests_the_best_start_beside_the_best_trial(tmp_path):
    """The issue: the report shows the best start against the best found, validation and test."""
    import json

    from hpsearch.report import write_report

    from hpsearch.config import RunSettings
    from hpsearch.search import run_study

    data = make_idx_dir(tmp_path / "data", n_train=300)
    space = tmp_path / "space.toml"  # starts that learn slowly (SGD at lr 1e-4), so a sampled trial wins
    space.write_text(SPACE + "[[start]]\nlr = 1e-4\nlayer_size = 16\noptimizer = 'sgd'\n"
                     + "[[start]]\nlr = 2e-4\nlayer_size = 16\noptimizer = 'sgd'\n")
    url, out = f"sqlite:///{tmp_path}/s.db", tmp_path / "report"
    run_study(RunSettings(trials=5, study="s", storage=url, dataset="idx", data_dir=str(data), space=str(space),
                          epochs=2, device="cpu", pruner="none", sampler="random"))
    trials = optuna.load_study(study_name="s", storage=url).trials
    best = max(trials, key=lambda t: t.value)
    start = max(trials[:2], key=lambda t: t.value)
    assert best.number >= 2, "a start was the best trial: the test needs a sampled one to win"
    lines = []
    write_report("s", url, out, data_dir=str(data), artifact=False, log=lines.append)
    tested = json.loads((out / "best.json").read_text())["best_start"]
    # the start retrained with its own seed is the trial's model: same validation accuracy
    assert tested["trial"] == start.number and tested["validation_accuracy"] == start.value
    summary = json.loads((out / "summary.json").read_text())
    best_test = json.loads((out / "best.json").read_text())["test_accuracy"]
    assert summary["best_start"]["test_accuracy"] == tested["test_accuracy"]
    assert summary["best_start"]["test_lead"] == pytest.approx(best_test - tested["test_accuracy"])
    assert f"test {tested['test_accuracy']:.4f}" in (out / "index.html").read_text()
    assert any("testing the best start" in line for line in lines)
    lines.clear()
    write_report("s", url, out, data_dir=str(data), artifact=False, log=lines.append)  # reused, not retrained
    assert not any("testing the best start" in line for line in lines)
    assert json.loads((out / "best.json").read_text())["best_start"] == tested


def test_a_validation_lead_within_two_standard_errors_is_called_possible_luck():
    from hpsearch.study.view import lead_within_noise, standard_error

    assert standard_error(0.91, 6000) == pytest.approx(0.00369, abs=1e-5)
    assert standard_error(0.9, None) is None
    se = standard_error(0.865, 1000)
    summary = {"validation_standard_error": se, "best_start": {"lead": 0.011}}
    assert lead_within_noise(summary)  # 0.011 on 1,000 images: 1.02 standard errors
    assert not lead_within_noise({**summary, "best_start": {"lead": 0.03}})
    assert not lead_within_noise({**summary, "best_start": {"lead": 0.0}})  # the best is the start
    assert not lead_within_noise({"validation_standard_error": se, "best_start": None})


def test_the_margin_pruner_stops_a_trial_only_beyond_the_validation_noise():
    from hpsearch.study.pruners import MarginMedianPruner, accuracy_margin, make_pruner
    from hpsearch.study.schema import StudyAttr, set_study_attr

    assert accuracy_margin(0.86, 1000) == pytest.approx(0.0219, abs=1e-4)
    assert accuracy_margin(0.86, None) == 0.0
    assert isinstance(make_pruner("median-margin", 20, starts=2), MarginMedianPruner)

    def verdict(values, validation=1000, pruner=None, complete=({1: 0.8, 2: 0.86, 3: 0.87},)):
        study = optuna.create_study(direction="maximize")
        if validation:
            set_study_attr(study._storage, study._study_id, StudyAttr.DATASET_INFO, {"validation": validation})
        for curve in complete:
            study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values=curve))
        trial = study.ask()
        for step, value in values.items():
            trial.report(value, step)
        pruner = pruner or MarginMedianPruner(n_startup_trials=1)
        return pruner.prune(study, study._storage.get_trial(trial._trial_id))

    # the median of the complete trials at epoch 2 is 0.86; two standard errors on 1,000 images: 0.022
    assert not verdict({2: 0.85})  # behind by 0.01: within the noise ...
    assert verdict({2: 0.85}, pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=2))  # ... Optuna's stops it
    assert verdict({2: 0.83})  # behind by 0.03: beyond it
    assert not verdict({1: 0.87, 2: 0.83})  # its best so far (0.87) counts, as in Optuna's
    assert not verdict({1: 0.70})  # never before the 2nd epoch
    assert verdict({2: 0.85}, validation=None)  # no validation size recorded: the plain median
    assert not verdict({5: 0.85})  # no complete trial reported epoch 5: nothing to compare with
    assert not verdict({2: 0.83}, pruner=MarginMedianPruner(n_startup_trials=2))  # one complete trial of 2 needed
    assert verdict({2: float("nan")})  # nothing but NaN: pruned, as Optuna's
    assert verdict({2: 0.83}, complete=({2: 0.86}, {2: float("nan")}))  # a complete trial's NaN is ignored


def test_the_start_comparison_says_what_was_tested_and_when_a_lead_may_be_luck():
    from hpsearch.study import start_comparison

    summary = {"best_start": {"trial": 0, "start": 1, "value": 0.854, "lead": 0.011},
               "validation_standard_error": 0.0108, "dataset_info": {"validation": 1000}}
    text = start_comparison(summary)  # --no-retrain: validation only
    assert "validation 0.8540; the search gained +0.0110 on validation (" in text
    assert "it may be luck; retrain to test both)" in text
    summary["best_start"].update(test_accuracy=0.85, test_lead=0.0015)
    text = start_comparison(summary)
    assert "test 0.8500; the search gained +0.0110 on validation, +0.0015 on test (" in text
    assert text.endswith("it may be luck)")
    summary["best_start"]["lead"] = 0.03  # beyond 2 x 0.0108
    assert "luck" not in start_comparison(summary)
    summary["best_start"]["lead"] = 0.0  # the best trial is the start
    assert start_comparison(summary) is None

"""Continuing a study by its name: flags left out come from the study; differing ones are refused
in one line, in flag syntax."""

import optuna
import pytest

from conftest import assert_one_line_error, cli


@pytest.fixture()
def args(fashion_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path}/s.db"
    return ["--storage", storage, "--data-dir", str(fashion_dir), "--device", "cpu"], storage


def _finished(storage, name):
    study = optuna.load_study(study_name=name, storage=storage)
    return [t for t in study.trials if t.state.is_finished()]


def test_continuing_needs_only_the_name_and_the_new_target(args, monkeypatch, capsys):
    common, storage = args
    code, _, err = cli(["run", "--study", "s", "--trials", "3", "--epochs", "2", "--subset", "2000", *common],
                       monkeypatch, capsys)
    assert code in (0, None), err
    best = optuna.load_study(study_name="s", storage=storage).best_value
    code, out, err = cli(["run", "--study", "s", "--trials", "5", *common], monkeypatch, capsys)
    assert code in (0, None), err
    assert f"continuing: 3 of 5 trials already finished, best {best:.4f}" in out  # not "best -"
    trials = _finished(storage, "s")
    assert len(trials) == 5 and max(t.user_attrs["epochs_run"] for t in trials) <= 2
    code, _, err = cli(["run", "--study", "s", "--trials", "6", "--epochs", "3", *common], monkeypatch, capsys)
    assert_one_line_error(code, err, "study 's' was created with --epochs 2;", "leave those flags out")
    code, _, err = cli(["run", "--study", "s", "--trials", "6", "--epochs", "3", "--subset", "1000", "--seed", "0",
                        *common], monkeypatch, capsys)
    assert_one_line_error(code, err, "--subset 2000, --epochs 2;")  # every difference at once; --seed 0 agrees
    code, _, err = cli(["run", "--study", "s", "--trials", "6", "--space", "cnn", *common], monkeypatch, capsys)
    assert_one_line_error(code, err, "the search space stored in the study (not hpsearch/spaces/cnn.toml)")
    assert len(_finished(storage, "s")) == 5  # nothing ran


def test_a_cnn_study_continues_with_its_stored_space(args, monkeypatch, capsys):
    common, storage = args
    code, _, err = cli(["run", "--study", "c", "--space", "cnn", "--trials", "2", "--epochs", "1", "--subset", "600",
                        "--no-start", *common], monkeypatch, capsys)
    assert code in (0, None), err
    code, _, err = cli(["run", "--study", "c", "--trials", "3", *common], monkeypatch, capsys)
    assert code in (0, None), err
    trials = _finished(storage, "c")
    assert len(trials) == 3 and all("conv_blocks" in t.params for t in trials)


def test_the_cli_names_the_identity_the_study_keeps():
    from hpsearch.cli import IDENTITY_FLAGS
    from hpsearch.study import IDENTITY

    assert set(IDENTITY_FLAGS) == set(IDENTITY)


def test_a_target_already_reached_says_there_is_nothing_to_do(args, monkeypatch, capsys):
    common, storage = args
    base = ["run", "--study", "n", "--epochs", "1", "--subset", "600", "--no-start", *common]
    assert cli([*base, "--trials", "2"], monkeypatch, capsys)[0] in (0, None)
    code, out, err = cli(["run", "--study", "n", "--trials", "1", *common], monkeypatch, capsys)
    assert code in (0, None), err
    assert "already holds 2 finished trials (--trials 1): nothing to do" in out and "--trials 3" in out
    assert len(_finished(storage, "n")) == 2


def test_version_and_short_help(monkeypatch, capsys):
    from hpsearch import __version__

    code, out, _ = cli(["--version"], monkeypatch, capsys)
    assert code in (0, None) and out.strip() == f"hpsearch {__version__}"
    code, out, _ = cli(["run", "-h"], monkeypatch, capsys)
    assert code in (0, None) and "--trials" in out


def test_help_lists_commands_in_the_order_they_are_used_and_flags_without_a_type(monkeypatch, capsys):
    code, out, _ = cli(["--help"], monkeypatch, capsys)
    assert code in (0, None)
    order = [out.index(f" {name} ") for name in ("run", "studies", "report", "dashboard", "export", "predict", "bench")]
    assert order == sorted(order)
    for command in ("run", "report", "predict"):
        code, out, _ = cli([command, "--help"], monkeypatch, capsys)
        assert code in (0, None) and "--storage" in out
        assert "<bool>" not in out and "BOOLEAN" not in out


def test_a_worker_reading_while_the_creator_writes_waits_for_the_whole_identity(tmp_path):
    """Workers started together: one creates the study and writes what it measures attribute by
    attribute (`created` last); another, continuing by name without the lock, must not read the
    dataset without the space and refuse the study (a CI failure of the four-worker test)."""
    import threading
    import time

    from hpsearch.config import RunSettings
    from hpsearch.space import load_space
    from hpsearch.study.continuing import continue_settings
    from hpsearch.study.schema import StudyAttr, set_study_attr
    from hpsearch.study.session import _identity, _write_identity

    url = f"sqlite:///{tmp_path}/s.db"
    settings = RunSettings(study="w", storage=url, space="mlp", epochs=3, given=("space", "epochs"))
    study = optuna.create_study(study_name="w", storage=url, direction="maximize")
    set_study_attr(study._storage, study._study_id, StudyAttr.DATASET, "fashion-mnist")  # the first write

    def creator_finishes():
        time.sleep(0.5)
        _write_identity(study, settings, load_space("mlp"), _identity(settings, load_space("mlp")))

    writer = threading.Thread(target=creator_finishes)
    writer.start()
    continued, space = continue_settings(settings)
    writer.join()
    assert continued.epochs == 3 and space.to_dict() == load_space("mlp").to_dict()

"""The search loop driving a population (the GPU default) — run here on the CPU."""

import optuna
from optuna.trial import TrialState

from hpsearch.search import RunSettings, run_study


def test_population_search_fills_prunes_and_refills(tmp_path, fashion_dir):
    storage = f"sqlite:///{tmp_path}/pop.db"
    # grouping "batch" is the GPU default (auto on a CPU trains exact shapes apart)
    summary = run_study(RunSettings(trials=10, epochs=4, subset=2000, storage=storage, study="pop",
                                    device="cpu", population=4, pruner="median", seed=3, grouping="batch"))
    assert summary.population == 4 and summary.trials_run == 10
    study = optuna.load_study(study_name="pop", storage=storage)
    trials = study.trials
    assert len(trials) == 10 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # trials really trained side by side: several shared a group at some epoch
    assert max(t.user_attrs["population"] for t in trials) >= 2
    # every trial has one intermediate value per epoch it trained, and its own learning curve
    for t in trials:
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, t.user_attrs["epochs_run"] + 1))
        assert t.user_attrs["curves"]["val_acc"] == [round(v, 6) for v in (t.intermediate_values[s] for s in steps)]
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["epochs_run"] == 4
    # slots were refilled: a trial started after another one had finished
    first_end = min(t.datetime_complete for t in trials)
    assert any(t.datetime_start > first_end for t in trials)
    assert study.best_value > 0.5
    assert 0 < summary.model_epochs <= 10 * 4


def test_gpu_precision_on_cpu_is_refused_before_the_study_is_touched(tmp_path, fashion_dir):
    import pytest

    from hpsearch.errors import HPSearchError

    storage = f"sqlite:///{tmp_path}/p.db"
    with pytest.raises(HPSearchError, match="needs a CUDA device"):
        run_study(RunSettings(trials=1, epochs=1, subset=500, storage=storage, device="cpu", precision="tf32"))
    assert not (tmp_path / "p.db").exists()


def test_grouping_auto_depends_on_the_device():
    import torch

    from hpsearch.config import resolve_grouping

    assert resolve_grouping("auto", torch.device("cpu")) == "shape"
    assert resolve_grouping("auto", torch.device("cuda")) == "batch"
    assert resolve_grouping("width", torch.device("cpu")) == "width"

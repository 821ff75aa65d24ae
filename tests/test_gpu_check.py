"""The CUDA-graph self-check (train/graphcheck.py), on a CPU: no GPU is lent to these tests.

The check's comparison takes its two paths as functions, so it is tested here with toy steps and
with the real population step standing in for a graph's replay ("fake graphs"), identical or
deliberately broken; a real GPU runs the same logic with a recorded torch.cuda.CUDAGraph.
"""

import math
from types import SimpleNamespace

import optuna
import pytest
import torch

from hpsearch.search import RunSettings, _Running, run_study
from hpsearch.study import AskedTrial
from hpsearch.train import EpochResult, PopulationTrainer, TrainConfig, graphcheck
from hpsearch.train.graphcheck import CUDA_GRAPH, EAGER, EAGER_CHECK_FAILED, compare_step_paths
from hpsearch.train.group import Group
from hpsearch.train.mlp import MLPGroup

# ----------------------------------------------------------------------------------------------
# The comparison, on a toy step: momentum SGD towards a target, with a step counter


def toy():
    w, m, count = torch.tensor([1.0, -2.0, 3.0]), torch.zeros(3), torch.zeros(1)
    target = torch.tensor([0.5, 0.5, 0.5])

    def step(update=True):
        m.mul_(0.9).add_(w - target)
        if update:
            w.sub_(1e-2 * m)
        count.add_(1)

    return w, m, count, step


def test_identical_paths_pass_and_leave_the_state_as_it_was():
    w, m, count, step = toy()
    step()  # a state that is not the initial one
    before = [t.clone() for t in (w, m, count)]
    check = compare_step_paths([w, count], lambda: step, step, 1e-3, restore_also=[m])
    assert check.passed and check.worst == 0.0 and check.error is None
    assert all(torch.equal(a, b) for a, b in zip(before, (w, m, count)))


def test_a_path_that_adds_1e_3_to_a_weight_is_caught():
    w, m, count, step = toy()

    def perturbed():
        step()
        w[1] += 1e-3

    check = compare_step_paths([w, count], lambda: perturbed, step, 1e-3, restore_also=[m])
    # the eager step moved w by at most 2.5e-2, so 1e-3 more is a 4% difference
    assert not check.passed and check.worst == pytest.approx(1e-3 / 2.5e-2, rel=1e-3)
    assert w.tolist() == [1.0, -2.0, 3.0] and m.tolist() == [0.0] * 3 and count.item() == 0


def test_a_path_that_skips_the_optimizer_update_is_caught():
    w, m, count, step = toy()
    check = compare_step_paths([w, count], lambda: (lambda: step(update=False)), step, 5e-2, restore_also=[m])
    assert not check.passed and check.worst == pytest.approx(1.0)


def test_a_capture_failure_fails_the_check_in_one_line_and_restores_the_state():
    w, m, count, step = toy()

    def capture():
        step()  # a capture that got half way
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    check = compare_step_paths([w, count], capture, step, 1e-3, restore_also=[m])
    assert not check.passed and math.isinf(check.worst)
    assert check.summary() == "capture failed: CUDA error: operation not permitted when stream is capturing"
    assert w.tolist() == [1.0, -2.0, 3.0] and count.item() == 0


def test_out_of_memory_during_the_check_is_the_trials_not_a_failed_check():
    w, m, count, step = toy()

    def capture():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RuntimeError, match="out of memory"):
        compare_step_paths([w, count], capture, step, 1e-3)


def test_nan_in_both_paths_agrees_nan_in_one_does_not():
    w, m, count, step = toy()
    w[0] = float("nan")
    assert compare_step_paths([w, count], lambda: step, step, 1e-3, restore_also=[m]).passed

    def nan_only_here():
        step()
        w[2] = float("nan")

    check = compare_step_paths([w, count], lambda: nan_only_here, step, 1e-3, restore_also=[m])
    assert not check.passed and math.isinf(check.worst) and check.to_dict()["max_rel_diff"] is None


def test_tolerances_follow_the_arithmetic(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert [graphcheck.tolerance(("cuda:0", p, "mlp")) for p in ("fp32", "tf32", "bf16")] == [1e-3, 1e-2, 5e-2]
    # cuDNN convolutions may use TF32 at fp32 unless told not to
    assert graphcheck.tolerance(("cuda:0", "fp32", "cnn")) == 1e-2
    assert graphcheck.tolerance(("cpu", "fp32", "cnn")) == 1e-3
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert graphcheck.tolerance(("cuda:0", "fp32", "cnn")) == 1e-3


# ----------------------------------------------------------------------------------------------
# The trainer: a fake "graph" whose replay is the population's own step, or a broken one


@pytest.fixture
def verdicts(monkeypatch):
    """A fresh per-process verdict cache for each test."""
    fresh = {}
    monkeypatch.setattr(graphcheck, "_VERDICTS", fresh)
    return fresh


class FakeGraphs:
    """Group.record_graph on a CPU: `replay` runs `how(group)` (default: the eager step itself)."""

    def __init__(self, monkeypatch, how=None, fail: Exception | None = None):
        self.recorded, self.how, self.fail = 0, how or (lambda group: group.step()), fail
        monkeypatch.setattr(Group, "record_graph", lambda group: self.record(group))

    def record(self, group):
        self.recorded += 1
        if self.fail is not None:
            raise self.fail
        return SimpleNamespace(replay=lambda: self.how(group))


def nudged(group):
    group.step()
    with torch.no_grad():
        group.W[0][0, 0, 0] += 1e-3


def without_update(group):
    group._update = lambda grads: None  # an instance attribute over the method, for this step only
    try:
        group.step()
    finally:
        del group._update


CONFIGS = {  # one multi-step group (batch 128) and one whose epoch is shorter than the warm-up (batch 2048)
    "a": TrainConfig(num_layers=3, layer_size=32, dropout=0.1, augment_shift=1.0, epochs=2, seed=1),
    "b": TrainConfig(num_layers=2, layer_size=16, optimizer="sgd", lr=0.05, epochs=2, seed=2),
    "big-batch": TrainConfig(num_layers=2, layer_size=16, batch_size=2048, epochs=2, seed=3),
}


def train(data, graphs: bool, configs=CONFIGS):
    """Every member's results and final weights, training through fake graphs or eagerly."""
    notes = []
    trainer = PopulationTrainer(data, grouping="batch", note=notes.append)
    trainer.use_graphs = graphs  # past the CUDA-only guard: the fake graphs run on the CPU
    for key, config in configs.items():
        trainer.add(key, config)
    results, weights = {}, {}
    while len(trainer):
        for r in trainer.run_epoch():
            results.setdefault(r.key, []).append(r)
            if r.finished:
                weights[r.key] = trainer.model(r.key).state_dict()
    return results, weights, notes


def assert_same_training(a, b):
    (ra, wa, _), (rb, wb, _) = a, b
    for key in ra:
        assert [(r.train_loss, r.val_loss, r.val_acc) for r in ra[key]] == \
               [(r.train_loss, r.val_loss, r.val_acc) for r in rb[key]], key
        assert all(torch.equal(wa[key][n], wb[key][n]) for n in wa[key]), key


@pytest.fixture(scope="module")
def eager_run(fashion_small):
    return train(fashion_small, graphs=False)


def test_a_graph_that_passes_trains_every_group_and_is_checked_once(fashion_small, monkeypatch, verdicts, eager_run):
    graphs = FakeGraphs(monkeypatch)
    checks = []
    real_check = Group.check_graph
    monkeypatch.setattr(Group, "check_graph", lambda self, tol: checks.append(tol) or real_check(self, tol))
    run = train(fashion_small, graphs=True)
    assert run[2] == [] and checks == [1e-3]  # one check for the process's first MLP group, fp32
    assert {r.train_path for rs in run[0].values() for r in rs} == {CUDA_GRAPH}
    assert_same_training(run, eager_run)  # the check left no trace: bitwise the eager training
    assert verdicts[("cpu", "fp32", "mlp")].passed and graphs.recorded == 2  # both groups recorded


def test_a_batch_norm_group_is_checked_as_a_kind_of_its_own_and_leaves_no_trace(fashion_small, monkeypatch,
                                                                                 verdicts):
    """The check steps twice from one state (graph, then eager) and puts the state back: running
    statistics included, or the trained members would differ from eager training."""
    # the graph replays the masked statistics; eager training on a CPU would use torch's kernel
    # for full batches (other rounding), so both use the masked ones here, as on a GPU
    monkeypatch.setattr(MLPGroup, "native_batch_norm", False)
    configs = {"bn": TrainConfig(num_layers=3, layer_size=32, dropout=0.1, batch_norm=True, epochs=2, seed=4),
               "bn-sgd": TrainConfig(num_layers=2, layer_size=16, optimizer="sgd", lr=0.05, batch_norm=True,
                                     epochs=2, seed=5)}
    eager = train(fashion_small, graphs=False, configs=configs)
    FakeGraphs(monkeypatch)
    run = train(fashion_small, graphs=True, configs=configs)
    assert run[2] == [] and set(verdicts) == {("cpu", "fp32", "mlp-bn")} and verdicts[("cpu", "fp32", "mlp-bn")].passed
    assert {r.train_path for rs in run[0].values() for r in rs} == {CUDA_GRAPH}
    assert_same_training(run, eager)


@pytest.mark.parametrize("broken", [nudged, without_update], ids=["adds-1e-3-to-a-weight", "skips-the-update"])
def test_a_graph_that_disagrees_is_dropped_for_eager_training_with_one_note(fashion_small, monkeypatch, verdicts,
                                                                         eager_run, broken):
    graphs = FakeGraphs(monkeypatch, how=broken)
    run = train(fashion_small, graphs=True)
    (note,) = run[2]
    assert note.startswith("CUDA graph check failed on cpu (fp32, mlp; max rel diff ")
    assert note.endswith(", tolerance 1e-03): training eagerly") and "\n" not in note
    assert {r.train_path for rs in run[0].values() for r in rs} == {EAGER_CHECK_FAILED}
    assert_same_training(run, eager_run)  # the failed graph's step was undone
    # the verdict is the process's: a later trainer trains eagerly without recording or noting
    recorded = graphs.recorded
    again = train(fashion_small, graphs=True, configs={"a": CONFIGS["a"]})
    assert again[2] == [] and graphs.recorded == recorded
    assert {r.train_path for r in again[0]["a"]} == {EAGER_CHECK_FAILED}


def test_a_capture_that_fails_falls_back_with_its_note(fashion_small, monkeypatch, verdicts, eager_run):
    FakeGraphs(monkeypatch, fail=RuntimeError("operation not permitted when stream is capturing"))
    run = train(fashion_small, graphs=True)
    assert run[2] == ["CUDA graph capture failed on cpu (fp32, mlp: operation not permitted when stream "
                      "is capturing): training eagerly"]
    assert {r.train_path for rs in run[0].values() for r in rs} == {EAGER_CHECK_FAILED}
    assert_same_training(run, eager_run)


def test_a_later_capture_failure_turns_its_kind_eager(fashion_small, monkeypatch, verdicts):
    graphs = FakeGraphs(monkeypatch)
    first = train(fashion_small, graphs=True, configs={"a": CONFIGS["a"]})
    assert first[0]["a"][0].train_path == CUDA_GRAPH
    graphs.fail = RuntimeError("capture of this shape failed")
    second = train(fashion_small, graphs=True, configs={"b": CONFIGS["b"]})
    assert second[2] == ["CUDA graph capture failed on cpu (fp32, mlp: capture of this shape failed): training eagerly"]
    assert [r.train_path for r in second[0]["b"]] == [EAGER_CHECK_FAILED] * 2
    assert not verdicts[("cpu", "fp32", "mlp")].passed


def test_each_family_has_its_own_verdict(fashion_small, monkeypatch, verdicts):
    """A CNN's convolutions are other kernels under capture: a broken CNN graph leaves the MLPs' alone."""
    FakeGraphs(monkeypatch, how=lambda g: nudged(g) if g.__class__.__name__ == "ConvGroup" else g.step())
    cnn = TrainConfig(family="cnn", conv_blocks=1, channels=4, num_layers=1, batch_size=512, epochs=1, seed=5)
    run = train(fashion_small, graphs=True, configs={"mlp": CONFIGS["b"], "cnn": cnn})
    assert len(run[2]) == 1 and run[2][0].startswith("CUDA graph check failed on cpu (fp32, cnn;")
    assert run[0]["mlp"][0].train_path == CUDA_GRAPH and run[0]["cnn"][0].train_path == EAGER_CHECK_FAILED


def test_out_of_memory_while_recording_reaches_the_search_loop(fashion_small, monkeypatch, verdicts):
    FakeGraphs(monkeypatch, fail=RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB"))
    with pytest.raises(RuntimeError, match="out of memory"):
        train(fashion_small, graphs=True, configs={"a": CONFIGS["a"]})
    assert verdicts == {}  # no verdict: the next group checks again


# ----------------------------------------------------------------------------------------------
# The trial attribute


def test_a_cpu_run_records_eager_training_in_each_trial(tmp_path, fashion_dir):
    storage = f"sqlite:///{tmp_path}/p.db"
    run_study(RunSettings(trials=2, epochs=1, subset=500, storage=storage, study="paths", device="cpu",
                          data_dir=str(fashion_dir), seed=1))
    trials = [t for t in optuna.load_study(study_name="paths", storage=storage).trials if t.state.is_finished()
              and t.state != optuna.trial.TrialState.FAIL]
    assert len(trials) == 2 and [t.user_attrs["train_path"] for t in trials] == [EAGER, EAGER]


def test_the_record_names_each_path_a_trial_took_in_order():
    running = _Running(AskedTrial(0, TrainConfig(epochs=3), {}), 100)
    for epoch, path in enumerate([CUDA_GRAPH, CUDA_GRAPH, EAGER_CHECK_FAILED], 1):
        running.add(EpochResult(0, epoch, 0.5, 0.8, 0.4, 0.7, 1.0, 4, train_path=path))
    assert running.record(3, "cuda:0:test", None).to_attrs()["train_path"] == \
           "cuda-graph, then eager (graph check failed)"

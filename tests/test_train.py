import math

import pytest
import torch
import torch.nn.functional as F

from hpsearch.train import PopulationTrainer, TrainConfig, init_member, permutations, train_one


def test_trainer_learns_real_fashion_mnist(fashion_small):
    config = TrainConfig(num_layers=3, layer_size=128, activation="relu", lr=2e-3, batch_size=64, epochs=3, seed=0)
    seen = []
    result = train_one(config, fashion_small, on_epoch=seen.append)
    accs = [r.val_acc for r in result.history]
    assert len(seen) == 3 and result.stopped is None and result.history[-1].finished
    assert accs[-1] > 0.78, accs  # chance is 0.10; a linear model reaches ~0.80 with this data
    assert result.history[-1].train_loss < result.history[0].train_loss
    # the returned module is standalone and agrees with the trainer's own validation accuracy
    with torch.no_grad():
        pred = result.model(fashion_small.val_x.view(-1, 1, 28, 28)).argmax(1)
    assert abs(float((pred == fashion_small.val_y).float().mean()) - accs[-1]) < 1e-3


def test_callback_stops_training(fashion_small):
    result = train_one(TrainConfig(num_layers=2, layer_size=32, epochs=5), fashion_small,
                       on_epoch=lambda r: r.epoch < 2)
    assert len(result.history) == 2 and result.stopped == "callback"


def test_divergence_ends_the_member_not_the_run(fashion_small):
    trainer = PopulationTrainer(fashion_small)
    trainer.add("bad", TrainConfig(num_layers=3, layer_size=64, optimizer="sgd", lr=5.0, momentum=0.9,
                                   batch_size=256, epochs=3, seed=1))
    trainer.add("good", TrainConfig(num_layers=3, layer_size=64, batch_size=256, epochs=2, seed=2))
    results = trainer.run_epoch()
    by_key = {r.key: r for r in results}
    assert by_key["bad"].diverged and "bad" not in trainer
    assert by_key["good"].diverged is None and math.isfinite(by_key["good"].val_loss)
    (second,) = trainer.run_epoch()
    assert second.key == "good" and second.finished and len(trainer) == 0


@pytest.mark.parametrize("optimizer, schedule, smoothing, batch_norm", [
    ("adamw", "constant", 0.0, False), ("sgd", "constant", 0.0, False), ("adamw", "cosine", 0.1, False),
    ("sgd", "cosine", 0.2, False), ("adamw", "cosine", 0.1, True), ("sgd", "constant", 0.0, True)])
def test_batched_optimizer_matches_torch_optim(fashion_small, optimizer, schedule, smoothing, batch_norm):
    """The trainer's AdamW / SGD+momentum (batched, hand-written), learning-rate schedule, label
    smoothing and batch norm against torch.optim + LambdaLR + F.cross_entropy(label_smoothing) +
    nn.BatchNorm1d, step by step (3,600 images at batch 128: the last batch of 16 is normalized
    over its own rows; running statistics compared too)."""
    from hpsearch.specs import lr_factor

    config = TrainConfig(num_layers=3, layer_size=48, activation="tanh", optimizer=optimizer, lr=3e-3,
                         weight_decay=1e-2, batch_size=128 if batch_norm else 100, epochs=2, seed=5,
                         schedule=schedule, label_smoothing=smoothing, batch_norm=batch_norm)
    ours = train_one(config, fashion_small, dtype=torch.float64).model.double()

    spec = config.model_spec(fashion_small)
    from hpsearch.models import NeuralNetwork

    ref = NeuralNetwork.from_spec(spec).double()
    with torch.no_grad():
        for linear, (w, b) in zip(ref.linears(), init_member(config, spec)):
            linear.weight.copy_(w.t())
            linear.bias.copy_(b)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(ref.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(ref.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    x_all = fashion_small.train_x.double()
    y_all = fashion_small.train_y
    total = config.epochs * math.ceil(len(y_all) / config.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, total, schedule))
    for epoch in range(config.epochs):
        perm = permutations([config.seed], [epoch], len(y_all), torch.device("cpu"))[0]
        for s in range(0, len(perm), config.batch_size):
            idx = perm[s:s + config.batch_size]
            loss = F.cross_entropy(ref(x_all[idx]), y_all[idx], label_smoothing=smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    assert sched.last_epoch == total
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert len(ref.batch_norms()) == (2 if batch_norm else 0)
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-7, atol=1e-9), (a - b).abs().max()


def _bn_group(data, batch_size: int):
    trainer = PopulationTrainer(data, dtype=torch.float64)
    trainer.add(0, TrainConfig(num_layers=3, layer_size=32, batch_norm=True, batch_size=batch_size, epochs=1, seed=3))
    trainer._rebuild()
    (group,) = trainer._groups.values()
    return group


def test_batch_norm_kernel_for_whole_batches_only(fashion_small, monkeypatch):
    """On a CPU full batches go through torch's batch-norm kernel, the partial last one through
    the masked statistics over its real rows; both give the same step (float64)."""
    native, masked = _bn_group(fashion_small, 1024), _bn_group(fashion_small, 1024)  # 3,600 rows: 3 full + 528
    assert native.use_native_batch_norm  # on a CPU
    masked.use_native_batch_norm = False
    calls = []
    kernel = native._batch_norm_whole
    monkeypatch.setattr(native, "_batch_norm_whole", lambda z, layer: (calls.append(layer), kernel(z, layer))[1])
    native.train_epoch()
    masked.train_epoch()
    assert calls == [0, 1] * 3 and not native.whole_batch  # 3 full batches x 2 hidden layers
    for a, b in zip([*native.params, *native.running], [*masked.params, *masked.running]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), (a - b).abs().max()


def test_last_partial_batch_is_used(fashion_small):
    # 3600 training images at batch 1024: 3 full batches and one of 528, averaged over its own size
    trainer = PopulationTrainer(fashion_small)
    trainer.add(0, TrainConfig(batch_size=1024, epochs=1))
    trainer._rebuild()
    (group,) = trainer._groups.values()
    n = len(fashion_small.train_y)
    assert group.steps_per_epoch == math.ceil(n / 1024)
    assert torch.allclose(group.row_weight.sum(1), torch.ones(group.steps_per_epoch))


def test_permutations_are_per_member_and_per_epoch():
    cpu = torch.device("cpu")
    p = permutations([1, 2, 1], [0, 0, 1], 1000, cpu)
    assert all(torch.equal(torch.sort(row).values, torch.arange(1000)) for row in p)
    assert not torch.equal(p[0], p[1]) and not torch.equal(p[0], p[2])
    assert torch.equal(p[0], permutations([1], [0], 1000, cpu)[0])  # alone == in a population


def test_bf16_autocast_path_trains(fashion_small):
    """bf16 is for GPUs; its code path (autocast around the batched forward) is exercised on CPU here."""
    trainer = PopulationTrainer(fashion_small)
    trainer.precision = "bf16"  # bypass the GPU-only guard to run the same code on CPU
    trainer.add(0, TrainConfig(num_layers=3, layer_size=64, batch_size=128, epochs=2, seed=0))
    trainer._rebuild()
    assert next(iter(trainer._groups.values())).autocast_bf16
    results = [trainer.run_epoch()[0] for _ in range(2)]
    assert results[-1].val_acc > 0.7 and math.isfinite(results[-1].train_loss)


def test_reduced_precision_needs_cuda(fashion_small):
    with pytest.raises(ValueError, match="CUDA"):
        PopulationTrainer(fashion_small, precision="tf32")

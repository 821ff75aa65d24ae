"""The CNN family: the trainer against torch's own modules and optimizers, a population against its
members alone, augmentation, checkpoints and spaces. Small subsets and few channels keep it fast."""

import math

import pytest
import torch
import torch.nn.functional as F

from hpsearch.specs import TrainConfig
from hpsearch.train import PopulationTrainer, permutations, train_one

CNN = dict(family="cnn", conv_blocks=2, channels=4, kernel_size=3, num_layers=2, layer_size=16, batch_size=100,
           epochs=2)


@pytest.fixture(scope="module")
def tiny(fashion_dir):
    from hpsearch.data import load_dataset

    return load_dataset("fashion-mnist", fashion_dir, "cpu", subset=1200, seed=0)


@pytest.mark.parametrize("optimizer, init, pooling, activation", [
    ("adamw", "default", "max", "relu"), ("sgd", "normal", "avg", "tanh"), ("adamw", "normal", "max", "leaky_relu")])
def test_cnn_trainer_matches_torch_modules_and_optim(tiny, optimizer, init, pooling, activation):
    """Grouped convolutions, head, init, schedule and label smoothing against nn.Conv2d / nn.Linear
    (the exported ConvNet) trained with torch.optim + LambdaLR on the same batches, float64."""
    from hpsearch.models import ConvNet
    from hpsearch.specs import lr_factor
    from hpsearch.train.cnn import init_cnn_member

    config = TrainConfig(**{**CNN, "kernel_size": 5 if pooling == "avg" else 3}, pooling=pooling, activation=activation,
                         optimizer=optimizer, init=init, lr=3e-3, weight_decay=1e-2, seed=3, schedule="cosine",
                         label_smoothing=0.1)
    ours = train_one(config, tiny, dtype=torch.float64).model.double()
    spec = config.model_spec(tiny)
    ref = ConvNet(spec).double()
    params = init_cnn_member(config, spec)
    blocks = spec.conv_blocks
    with torch.no_grad():
        for j, conv in enumerate(ref.convs()):
            conv.weight.copy_(params[j]), conv.bias.copy_(params[blocks + j])
        for j, linear in enumerate(ref.linears()):
            linear.weight.copy_(params[2 * blocks + j].t()), linear.bias.copy_(params[2 * blocks + spec.num_layers + j].view(-1))
    if init == "normal":  # the seeds' init: zero Linear biases
        assert all(torch.count_nonzero(l.bias) == 0 for l in ref.linears())
    opt = (torch.optim.AdamW(ref.parameters(), lr=config.lr, weight_decay=config.weight_decay) if optimizer == "adamw"
           else torch.optim.SGD(ref.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay))
    x_all, y_all = tiny.train_x.double(), tiny.train_y
    total = config.epochs * math.ceil(len(y_all) / config.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, total, "cosine"))
    for epoch in range(config.epochs):
        perm = permutations([config.seed], [epoch], len(y_all), torch.device("cpu"))[0]
        for s in range(0, len(perm), config.batch_size):
            idx = perm[s:s + config.batch_size]
            loss = F.cross_entropy(ref(x_all[idx].view(-1, 1, 28, 28)), y_all[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), (name, (a - b).abs().max())


MIXED = {  # one shape (a stacked group of three) and another; everything else per member
    "relu-adamw-aug": TrainConfig(**CNN, seed=1, lr=2e-3, conv_dropout=0.2, dropout=0.3, augment_rotate=12.0,
                                  augment_shift=2.0, schedule="cosine", label_smoothing=0.1),
    "tanh-sgd-normal": TrainConfig(**CNN, seed=2, activation="tanh", optimizer="sgd", lr=2e-2, init="normal",
                                   weight_decay=1e-3),
    "leaky-adamw-shift": TrainConfig(**{**CNN, "epochs": 3}, seed=3, activation="leaky_relu", augment_shift=1.0,
                                     dropout=0.2),
    "other-shape": TrainConfig(**{**CNN, "conv_blocks": 1, "pooling": "avg", "num_layers": 1}, seed=4, lr=3e-3,
                               conv_dropout=0.1, augment_rotate=10.0),
}


def test_cnn_population_equals_members_alone(tiny):
    """float64: stacked into grouped convolutions, joining late, each member trains as it does alone."""
    alone = {key: train_one(config, tiny, dtype=torch.float64) for key, config in MIXED.items()}
    trainer = PopulationTrainer(tiny, dtype=torch.float64, stack_convs=True)
    late = "leaky-adamw-shift"
    for key, config in MIXED.items():
        if key != late:
            trainer.add(key, config)
    histories, models, first = {key: [] for key in MIXED}, {}, True
    while len(trainer):
        for r in trainer.run_epoch():
            histories[r.key].append(r)
            if r.finished:
                models[r.key] = trainer.model(r.key)
        if first:
            trainer.add(late, MIXED[late])
            first = False
    for key in MIXED:
        for a, b in zip(alone[key].history, histories[key], strict=True):
            assert a.val_loss == pytest.approx(b.val_loss, rel=1e-9), key
            assert a.train_loss == pytest.approx(b.train_loss, rel=1e-9), key
            assert a.val_acc == b.val_acc, key
        for wa, wb in zip(alone[key].model.state_dict().values(), models[key].state_dict().values()):
            assert torch.allclose(wa, wb, rtol=1e-8, atol=1e-10), key
    assert max(r.group_size for h in histories.values() for r in h) == 3  # it really was stacked


def test_cpu_trains_each_cnn_member_alone_by_default(tiny):
    trainer = PopulationTrainer(tiny)
    for key in ("a", "b"):
        trainer.add(key, TrainConfig(**CNN, seed=len(key)))
    assert {r.group_size for r in trainer.run_epoch()} == {1}


def _augment(x, rotate, shift, seed=0, step=0):
    from types import SimpleNamespace

    from hpsearch.train.augment import augment
    from hpsearch.train.randomness import seed_mix

    K = len(rotate)
    group = SimpleNamespace(rotate=torch.tensor(rotate).view(K, 1, 1), shift=torch.tensor(shift).view(K, 1, 1),
                            augments=torch.tensor([r > 0 or s > 0 for r, s in zip(rotate, shift)]).view(K, 1, 1),
                            augment_seed32=torch.tensor([seed_mix(seed + k, 4) for k in range(K)]),
                            step_count=torch.full((K, 1, 1), float(step)))
    return augment(x, (28, 28), 0.0, group)


def test_augmentation_moves_images_within_limits(tiny):
    x = tiny.train_x[:64].expand(3, -1, -1).contiguous()
    out = _augment(x, [0.0, 15.0, 0.0], [0.0, 0.0, 2.0])
    assert torch.equal(out[0], x[0])  # no augmentation: untouched, bit for bit
    assert not torch.allclose(out[1], x[1]) and not torch.allclose(out[2], x[2])
    # a rotation about the centre or a 2-pixel shift keeps most of the ink (garments fill the frame)
    assert ((out[1:].sum(-1) / x[1:].sum(-1)) > 0.8).all()
    # each image of a batch gets its own draw, and the next step another
    again = _augment(x, [0.0, 15.0, 0.0], [0.0, 0.0, 2.0], step=1)
    assert not torch.allclose(again[1], out[1])
    # whole-pixel shifts land exactly: shifting a one-hot pixel image moves the pixel, to the pixel
    dot = torch.zeros(1, 1, 784)
    dot[0, 0, 14 * 28 + 14] = 1.0
    moved = _augment(dot.expand(1, 200, 784).contiguous(), [0.0], [1.0])
    assert (moved.amax(-1) <= 1.0 + 1e-6).all() and (moved.sum(-1) - 1).abs().max() < 1e-5


def test_cnn_checkpoint_rebuilds_and_old_mlp_checkpoints_load(tiny, tmp_path):
    from hpsearch.checkpoint import load_checkpoint, save_checkpoint

    model = train_one(TrainConfig(**{**CNN, "epochs": 1}), tiny).model
    path = save_checkpoint(tmp_path / "cnn.pt", model, classes=tiny.classes)
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["spec"]["family"] == "cnn" and type(loaded).__name__ == "ConvNet"
    x = tiny.val_x[:50]
    with torch.no_grad():
        assert torch.equal(loaded(x.view(-1, 1, 28, 28)), model(x.view(-1, 1, 28, 28)))
    # a checkpoint written before the CNN family: its spec has no family, height or width
    mlp = train_one(TrainConfig(num_layers=2, layer_size=8, epochs=1), tiny).model
    old = save_checkpoint(tmp_path / "old.pt", mlp, classes=tiny.classes)
    raw = torch.load(old, weights_only=True)
    for key in ("family", "conv_blocks", "channels", "kernel_size", "pooling", "conv_dropout", "height", "width"):
        raw["spec"].pop(key)
    torch.save(raw, old)
    assert type(load_checkpoint(old)[0]).__name__ == "NeuralNetwork"


def test_shipped_cnn_space_and_family_checks(tmp_path):
    from hpsearch.errors import SpaceError
    from hpsearch.space import load_space, parse_space

    space = load_space("cnn")
    assert space.families == ("cnn",) and space.starts
    assert load_space("mlp").families == ("mlp",)
    for start in space.starts:  # every start builds a valid CNN on 28x28 images
        config = TrainConfig.from_params({**space.fixed, **start})
        assert config.family == "cnn" and config.conv_blocks >= 1
    with pytest.raises(SpaceError, match="only apply to the cnn family"):
        parse_space('[params.channels]\ntype = "int"\nlow = 8\nhigh = 16\n', "x.toml")
    with pytest.raises(SpaceError, match="kernel_size"):
        parse_space('[params.kernel_size]\ntype = "categorical"\nchoices = [3, 4]\n[fixed]\nfamily = "cnn"\n', "x.toml")


def test_stacked_convolutions_check_themselves_and_fall_back(tiny, monkeypatch):
    """The GPU path (stacked members) is compared with the members alone when first built; a wrong
    result (simulated here) makes the trainer say so and train each CNN member on its own."""
    from hpsearch.train.cnn import ConvGroup

    notes = []
    good = PopulationTrainer(tiny, stack_convs=True, note=notes.append)
    for key in ("a", "b"):
        good.add(key, TrainConfig(**CNN, seed=len(key)))
    assert {r.group_size for r in good.run_epoch()} == {2} and notes == []

    real = ConvGroup._forward
    monkeypatch.setattr(ConvGroup, "_forward", lambda self, x, train: real(self, x, train) * (1.5 if self.K > 1 else 1))
    bad = PopulationTrainer(tiny, stack_convs=True, note=notes.append)
    for key in ("a", "b"):
        bad.add(key, TrainConfig(**CNN, seed=len(key)))
    results = bad.run_epoch()
    assert {r.group_size for r in results} == {1} and not bad.stack_convs
    assert len(notes) == 1 and "disagree" in notes[0]


def test_cnn_study_runs_reports_and_records_its_family(fashion_dir, tmp_path, monkeypatch, capsys):
    """`run --space cnn` end to end on a small subset: the study, the report's retrained checkpoint
    and `predict` all know the family."""
    import json

    from conftest import cli

    monkeypatch.chdir(tmp_path)
    storage = f"sqlite:///{tmp_path}/s.db"
    code, out, err = cli(["run", "--space", "cnn", "--subset", "800", "--trials", "3", "--epochs", "1", "--study", "c",
                          "--storage", storage, "--data-dir", str(fashion_dir), "--device", "cpu"], monkeypatch, capsys)
    assert code in (0, None), err
    assert "cnn 2x32c k3 max + 2x128 relu" in out  # the first [[start]], described as a CNN
    code, out, err = cli(["report", "--study", "c", "--storage", storage, "--data-dir", str(fashion_dir),
                          "--out", str(tmp_path / "r")], monkeypatch, capsys)
    assert code in (0, None), err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["family"] == "cnn"
    ckpt = torch.load(tmp_path / "r" / "best_model.pt", weights_only=True)
    assert ckpt["spec"]["family"] == "cnn" and ckpt["spec"]["conv_blocks"] >= 1
    for chart in ("confusion_matrix", "misclassified", "retrain_curves", "size"):
        assert (tmp_path / "r" / "charts" / f"{chart}.html").is_file(), chart

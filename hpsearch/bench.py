"""`hpsearch bench`: throughput of the ways to train the same model, measured in one run.

Rows (all on the same device, same dataset, same fixed model unless said otherwise; models: two
MLPs and the seeds' CNN, 32 -> 64 channels of 3x3 convolutions, max pooling, a 128-wide head):
  seeds      the seeds' way: a torchvision-style Dataset (PIL image -> ToTensor -> Normalize per
             sample), DataLoader(batch_size=32, shuffle=True), nn.Module, torch.optim.AdamW
  eager      device-resident tensors, index-slice batches, plain nn.Module + torch.optim.AdamW
  hpsearch   hpsearch's trainer, one model (population of 1; CUDA graphs on a GPU), at the eager
             row's batch 128 and at batch 1024 (hpsearch-big)
  pop-K      hpsearch's trainer, K models of the same shape trained as one batched computation
             (for the CNN: one grouped convolution, which the trainer only does on a GPU)
CNN only: eager-cl (channels-last memory format), hpsearch-cl and hpsearch-nchw (the trainer with
either format forced; `hpsearch` is its default: channels-last on a CPU) and hpsearch-1t (one
thread: what each of `--workers 2` gets on a 2-core machine). The CNN's trainer rows time whole epochs of a
6,000-image slice of the training split (a full epoch takes ~20 s on a 2-core CPU).
All rows run with denormals flushed to zero (the trainer does this on CPU; without it, late-epoch
denormals can slow a CPU step ~30x, which would flatter hpsearch against the seeds' loop).
Units: samples/s (one sample through one model, forward + backward + update) and model-epochs/s
(one model over the whole training split). `roofline` is a large fp32 matmul measured in the same
run, turned into the model-epochs/s that the MLP's FLOPs would allow at that rate.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import Dataset, load_dataset
from .errors import HPSearchError, as_user_error
from .config import GROUPINGS, resolve_device
from .models import model_from_spec
from .specs import ModelSpec
from .train import PopulationTrainer, TrainConfig

# Two fixed MLPs: a small one like the seeds' hand-tuned models (where per-step overhead rules), and
# the 4x512 of the speed issue (where arithmetic starts to matter); and the seeds' CNN.
BENCH_MODELS = {
    "3x128": dict(num_layers=3, layer_size=128, activation="relu"),
    "4x512": dict(num_layers=4, layer_size=512, activation="relu"),
    "cnn": dict(family="cnn", conv_blocks=2, channels=32, kernel_size=3, pooling="max", num_layers=2,
                layer_size=128, activation="relu"),
}
CNN_TRAINER_IMAGES = 6000
SEEDS_BATCH = 32
EAGER_BATCH = 128
BIG_BATCH = 1024  # the largest batch the default space samples: cheap when the data is on the device
FAST_BATCH = 256


@dataclass
class _Timer:
    seconds: float
    samples: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spec(data: Dataset, shape: dict, normalize: bool = True) -> ModelSpec:
    h, w = data.image_shape
    return ModelSpec.from_dict(shape, in_features=data.in_features, num_classes=data.num_classes, height=h, width=w,
                               mean=data.mean if normalize else 0.0, std=data.std if normalize else 1.0)


def model_flops_per_sample(data: Dataset, model: dict) -> float:
    """Forward + backward: ~6 FLOPs per weight per sample, a convolution's weights once per pixel."""
    spec = _spec(data, model)
    w = spec.widths
    flops = 6.0 * sum(a * b for a, b in zip(w[:-1], w[1:]))
    h, wd = spec.image_hw
    for c_in, c_out in zip([1] + spec.conv_channels[:-1], spec.conv_channels):
        flops += 6.0 * h * wd * c_in * c_out * spec.kernel_size**2
        h, wd = h // 2, wd // 2
    return flops


def bench_seeds(data: Dataset, model_shape: dict, raw_images: np.ndarray, raw_labels: np.ndarray,
                seconds: float) -> _Timer:
    """The seeds' loop: per-sample PIL -> tensor transforms through a DataLoader at batch 32."""
    from PIL import Image
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset
    from torchvision import transforms

    class MNISTLike(TorchDataset):  # what torchvision.datasets.MNIST.__getitem__ does
        def __init__(self, images, labels, transform):
            self.images, self.labels, self.transform = images, labels, transform

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            img = Image.fromarray(self.images[i], mode="L")
            return self.transform(img), int(self.labels[i])

    device = data.train_x.device
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((data.mean,), (data.std,))])
    loader = DataLoader(MNISTLike(raw_images, raw_labels, tf), batch_size=SEEDS_BATCH, shuffle=True)
    model = model_from_spec(_spec(data, model_shape, normalize=False)).to(device)  # ToTensor+Normalize did it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return _timed_loop(device, seconds, _loader_steps(loader, model, opt, device))


def _loader_steps(loader, model, opt, device):
    while True:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            yield len(y)


def bench_eager(data: Dataset, model_shape: dict, seconds: float, batch: int, channels_last: bool = False) -> _Timer:
    """Plain PyTorch on device-resident tensors: the obvious fast rewrite, one model."""
    device = data.train_x.device
    model = model_from_spec(_spec(data, model_shape)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x_all, y_all = data.train_x.view(-1, 1, *data.image_shape), data.train_y
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x_all = x_all.contiguous(memory_format=torch.channels_last)

    def steps():
        while True:
            perm = torch.randperm(len(y_all), device=device)
            for s in range(0, len(perm), batch):
                idx = perm[s:s + batch]
                # the same fast gather as hpsearch's trainer, so this row differs only in the step
                loss = F.cross_entropy(model(x_all.index_select(0, idx)), y_all.index_select(0, idx))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                yield len(idx)

    return _timed_loop(device, seconds, steps())


def _timed_loop(device: torch.device, seconds: float, steps) -> _Timer:
    # warm up (allocator, cuBLAS heuristics, DataLoader iterator) before timing
    for _ in range(5):
        next(steps)
    _sync(device)
    start = time.perf_counter()
    samples = 0
    while True:
        samples += next(steps)
        if time.perf_counter() - start >= seconds:
            _sync(device)
            return _Timer(time.perf_counter() - start, samples)


def bench_trainer(data: Dataset, model_shape: dict, k: int, epochs: int, batch: int,
                  precision: str = "fp32") -> _Timer:
    """hpsearch's trainer with K identical-shape members (different seeds), whole epochs."""
    trainer = PopulationTrainer(data, precision=precision, stack_convs=True)
    for i in range(k):
        trainer.add(i, TrainConfig(**model_shape, batch_size=batch, epochs=epochs + 1, seed=i))
    trainer.run_epoch()  # warm-up epoch: group build, graph capture
    _sync(data.train_x.device)
    start = time.perf_counter()
    for _ in range(epochs):
        trainer.run_epoch()
    _sync(data.train_x.device)
    return _Timer(time.perf_counter() - start, k * epochs * len(data.train_y))


def mixed_configs(k: int, batch: int = FAST_BATCH, seed: int = 0) -> list[TrainConfig]:
    """K shapes as the default space samples them: depth 2-5, width log-uniform in 32-1024."""
    rng = np.random.default_rng(seed)
    return [TrainConfig(num_layers=int(rng.integers(2, 6)), layer_size=int(round(np.exp(rng.uniform(np.log(32), np.log(1024))))),
                        batch_size=batch, epochs=10, seed=i) for i in range(k)]


def bench_grouping(data: Dataset, configs: list[TrainConfig], grouping: str) -> dict:
    """One epoch of a mixed-shape population under a grouping policy (after a warm-up on CUDA)."""
    trainer = PopulationTrainer(data, grouping=grouping)
    for i, config in enumerate(configs):
        trainer.add(i, config)
    if data.train_x.device.type == "cuda":
        trainer.run_epoch()  # group build and graph capture
    _sync(data.train_x.device)
    start = time.perf_counter()
    trainer.run_epoch()
    _sync(data.train_x.device)
    seconds = time.perf_counter() - start
    useful = sum(model_flops_per_sample(data, c.to_dict()) for c in configs)
    padded = 0.0
    for group in trainer._groups.values():
        padded += group.K * model_flops_per_sample(data, {"num_layers": group.L, "layer_size": group.H})
    return {"grouping": grouping, "models": len(configs), "groups": len(trainer._groups),
            "model_epochs_per_s": len(configs) / seconds, "seconds": seconds,
            "useful_flop_share": useful / padded}


def matmul_roofline(device: torch.device, seconds: float = 0.5) -> float:
    """Measured fp32 matmul FLOP/s (TF32 off) on a large square problem."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a @ b
        _sync(device)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
            if device.type == "cuda" and reps % 10:
                continue
            _sync(device)
        _sync(device)
        return 2 * n**3 * reps / (time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@dataclass
class _BenchRun:
    """What every model's rows share: the data, the device and the measurement budget."""

    data: Dataset
    device: torch.device
    raw: np.ndarray  # uint8 images, as the seeds' loop reads them through PIL
    raw_labels: np.ndarray
    seconds: float
    epochs: int
    populations: tuple[int, ...]
    flops: float  # measured matmul rate


def _model_rows(run: _BenchRun, shape: dict) -> list[dict]:
    """Every way of training one model shape, timed in turn."""
    data, n_train, rows = run.data, len(run.data.train_y), []
    cnn = shape.get("family") == "cnn"
    tdata = _first(data, CNN_TRAINER_IMAGES) if cnn else data  # whole epochs of a CNN are slow

    def add(name: str, what: str, t: _Timer, k: int = 1) -> None:
        sps = t.samples / t.seconds
        rows.append({"name": name, "what": what, "models": k, "samples_per_s": sps,
                     "model_epochs_per_s": sps / n_train, "seconds": t.seconds})

    add("seeds", f"DataLoader + per-sample ToTensor, batch {SEEDS_BATCH}",
        bench_seeds(data, shape, run.raw, run.raw_labels, run.seconds))
    add("eager", f"device tensors, nn.Module + AdamW, batch {EAGER_BATCH}",
        bench_eager(data, shape, run.seconds, EAGER_BATCH))
    fast = "CUDA graph" if run.device.type == "cuda" else "eager on CPU"
    add("hpsearch", f"hpsearch trainer, 1 model ({fast}), batch {EAGER_BATCH}",
        bench_trainer(tdata, shape, 1, run.epochs, EAGER_BATCH))
    if cnn:
        _cnn_rows(run, shape, tdata, add)
    else:
        add("hpsearch-big", f"hpsearch trainer, 1 model ({fast}), batch {BIG_BATCH}",
            bench_trainer(data, shape, 1, run.epochs, BIG_BATCH))
    for k in run.populations:
        add(f"pop-{k}", f"hpsearch trainer, {k} models at once, batch {FAST_BATCH}",
            bench_trainer(tdata, shape, k, run.epochs, FAST_BATCH), k)
    if run.device.type == "cuda":
        k = max(run.populations)
        for precision in ("tf32", "bf16"):
            add(f"pop-{k}-{precision}", f"as pop-{k}, {precision} matmuls",
                bench_trainer(tdata, shape, k, run.epochs, FAST_BATCH, precision), k)
    base, eager = rows[0]["samples_per_s"], rows[1]["samples_per_s"]
    for r in rows:
        r["vs_seeds"] = r["samples_per_s"] / base
        r["vs_eager"] = r["samples_per_s"] / eager
    return rows


def _cnn_rows(run: _BenchRun, shape: dict, tdata: Dataset, add) -> None:
    """Memory format and thread count, measured for the CNN (the MLP has no channels)."""
    from .train.cnn import ConvGroup

    add("eager-cl", "as eager, channels-last", bench_eager(run.data, shape, run.seconds, EAGER_BATCH, True))
    for name, last in (("hpsearch-cl", True), ("hpsearch-nchw", False)):
        ConvGroup.channels_last = last
        try:
            add(name, f"as hpsearch, {'channels-last' if last else 'NCHW'} forced",
                bench_trainer(tdata, shape, 1, run.epochs, EAGER_BATCH))
        finally:
            ConvGroup.channels_last = None
    if run.device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            add("hpsearch-1t", "as hpsearch, 1 thread (one of --workers 2 on 2 cores)",
                bench_trainer(tdata, shape, 1, run.epochs, EAGER_BATCH))
        finally:
            torch.set_num_threads(threads)


def _first(data: Dataset, n: int) -> Dataset:
    """The dataset with only its first n training images and a validation split cut in the same
    proportion, so evaluation costs the trainer rows what it costs in a real epoch (time per
    sample is what is measured)."""
    from dataclasses import replace

    n_val = max(1, round(len(data.val_y) * n / len(data.train_y)))
    return replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n], val_x=data.val_x[:n_val],
                   val_y=data.val_y[:n_val])


def _model_result(run: _BenchRun, model_name: str) -> dict:
    shape = BENCH_MODELS[model_name]
    rows = _model_rows(run, shape)
    base = rows[0]["samples_per_s"]
    per_sample = model_flops_per_sample(run.data, shape)
    return {
        "model": model_name, "shape": shape, "rows": rows,
        "roofline_model_epochs_per_s": run.flops / per_sample / len(run.data.train_y),
        "model_flops_per_sample": per_sample,
        "hpsearch_vs_seeds": next(r for r in rows if r["name"] == "hpsearch")["samples_per_s"] / base,
        "best_vs_seeds": max(r["vs_seeds"] for r in rows),
        "best_vs_eager": max(r["vs_eager"] for r in rows),
    }


def run_bench(device: str = "auto", dataset: str = "fashion-mnist", data_dir: str | None = None,
              quick: bool = False, populations: tuple[int, ...] | None = None,
              models: tuple[str, ...] = tuple(BENCH_MODELS), seconds: float | None = None,
              subset: int | None = None, mixed: int | None = None) -> dict:
    """Time every way on every model; see the module docstring for the rows."""
    with as_user_error():
        dev = resolve_device(device)
    unknown = set(models) - set(BENCH_MODELS)
    if unknown:
        raise HPSearchError(f"unknown bench model {', '.join(sorted(unknown))}; choose from {', '.join(BENCH_MODELS)}")
    data = load_dataset(dataset, data_dir, dev, subset=subset)
    # hpsearch's trainer flushes denormals on CPU; every row gets the same, so no row is slowed by them
    torch.set_flush_denormal(True)
    # The seeds' loop reads raw uint8 images through PIL, as torchvision's MNIST dataset does.
    raw = data.train_x.view(-1, *data.image_shape).mul(255).round().to(torch.uint8).cpu().numpy()
    run = _BenchRun(data, dev, raw, data.train_y.cpu().numpy(),
                    seconds=seconds if seconds is not None else (2.0 if quick else 6.0),
                    epochs=1 if quick or dev.type == "cpu" else 3,
                    populations=populations or ((8, 32, 128) if dev.type == "cuda" else (4,)),
                    flops=matmul_roofline(dev))
    results = [_model_result(run, name) for name in models]
    # Mixed shapes: does padding into few groups beat exact shapes in many? (GPU default: 32 models)
    if mixed is None:
        mixed = 32 if dev.type == "cuda" else 0
    grouping = [bench_grouping(data, mixed_configs(mixed), g) for g in GROUPINGS] if mixed else []
    return {
        "grouping": grouping,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
        f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "dataset": data.name, "train_samples": len(data.train_y),
        "matmul_flops": run.flops, "models": results,
    }


def print_bench(results: dict, console) -> None:
    from rich.table import Table

    for res in results["models"]:
        kind = "CNN" if res["shape"].get("family") == "cnn" else "MLP"
        table = Table(title=f"{res['model']} {kind} on {results['dataset']} ({results['train_samples']} train), "
                            f"{results['device']}, torch {results['torch']}")
        for col in ("way", "what", "samples/s", "model-epochs/s", "vs seeds", "vs eager"):
            table.add_column(col, justify="left" if col in ("way", "what") else "right", no_wrap=col != "what")
        for r in res["rows"]:
            table.add_row(r["name"], r["what"], f"{r['samples_per_s']:,.0f}", f"{r['model_epochs_per_s']:.3f}",
                          f"{r['vs_seeds']:.1f}x", f"{r['vs_eager']:.2f}x")
        roof = res["roofline_model_epochs_per_s"]
        table.add_row("roofline", f"its FLOPs at the measured fp32 matmul rate ({results['matmul_flops'] / 1e9:,.0f} GFLOP/s)",
                      f"{roof * results['train_samples']:,.0f}", f"{roof:.3f}", "", "")
        console.print(table)
        console.print(f"{res['model']}: hpsearch trainer vs the seeds' way {res['hpsearch_vs_seeds']:.1f}x (one model); "
                      f"best row {res['best_vs_seeds']:.1f}x vs seeds, {res['best_vs_eager']:.2f}x vs eager")
    if results.get("grouping"):
        table = Table(title="mixed shapes from the default space (batch 256): padding vs grouping")
        for col in ("grouping", "models", "groups", "useful FLOP share", "model-epochs/s"):
            table.add_column(col, justify="left" if col == "grouping" else "right")
        for g in results["grouping"]:
            table.add_row(g["grouping"], str(g["models"]), str(g["groups"]), f"{g['useful_flop_share']:.0%}",
                          f"{g['model_epochs_per_s']:.3f}")
        console.print(table)

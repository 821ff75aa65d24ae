"""`hpsearch doctor`: what a bug report needs to know about this machine, in one paste.

Devices (is CUDA available, each GPU's name, memory and capability), the versions of everything
that changes the numbers (Python, torch, CUDA, cuDNN, Optuna, numpy, hpsearch), the CUDA-graph
self-check of the trainer (train/graphcheck.py) run here for each precision and model family, and
a few seconds of training throughput of the default MLP. Every section reports its own failure
as one line instead of stopping the others: a broken GPU is what a user runs this to describe.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
import warnings

import torch

from . import __version__
from .config import resolve_device
from .data import Dataset, load_dataset
from .errors import HPSearchError, as_user_error, first_line
from .specs import TrainConfig
from .train import PopulationTrainer
from .train import graphcheck

NO_GPU = "no GPU: nothing to check; training runs eagerly on the CPU"
THROUGHPUT_IMAGES = 6000  # a stratified subset of the real training file: 5,400 train, 600 validation
SYNTHETIC_IMAGES = 6000
# The graph check trains a two-member population of each family for one short epoch on synthetic
# images: the members differ in optimizer, dropout, augmentation, schedule and label smoothing, so
# the recorded step holds each kind of kernel a search uses (and the mixed-optimizer update).
CHECK_IMAGES = 1024
CHECK_CONFIGS = {
    "mlp": (dict(num_layers=3, layer_size=128, dropout=0.1, augment_rotate=10.0, augment_shift=2.0,
                 schedule="cosine", seed=1),
            dict(num_layers=2, layer_size=64, optimizer="sgd", lr=0.01, label_smoothing=0.1, seed=2)),
    # the default space's MLPs: batch norm (checked as a kind of its own), padded in depth and width
    "mlp-bn": (dict(num_layers=3, layer_size=128, dropout=0.1, batch_norm=True, augment_shift=1.0,
                    schedule="cosine", label_smoothing=0.1, seed=5),
               dict(num_layers=2, layer_size=64, optimizer="sgd", lr=0.01, batch_norm=True, seed=6)),
    "cnn": (dict(family="cnn", conv_blocks=2, channels=16, num_layers=2, layer_size=64, conv_dropout=0.1,
                 augment_shift=2.0, seed=3),
            dict(family="cnn", conv_blocks=2, channels=16, num_layers=2, layer_size=64, optimizer="sgd",
                 lr=0.01, activation="tanh", seed=4)),
}


def run_doctor(device: str = "auto", data_dir: str | None = None, seconds: float = 3.0) -> dict:
    """The whole report as a JSON-ready dict (see `format_report` for the text form)."""
    if not seconds > 0:
        raise HPSearchError(f"--seconds must be positive, got {seconds}")
    with as_user_error():  # --device cuda without a GPU: one line
        dev = resolve_device(device)
    return {"hpsearch": __version__, "versions": versions(), "platform": machine(), "cuda": cuda_devices(),
            "device": str(dev), "graph_check": _section(lambda: graph_self_check(dev)),
            "throughput": _section(lambda: measure_throughput(dev, data_dir, seconds))}


def _section(make) -> dict:
    """A section, or the one line saying why it could not be made (the rest of the report still is)."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - a diagnostic reports every failure, it does not stop on one
        return {"error": f"{type(exc).__name__}: {first_line(exc, 200)}"}


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)  # not `import optuna`: only hpsearch.study imports it
    except importlib.metadata.PackageNotFoundError:
        return None


def _cudnn_text() -> str | None:
    try:
        v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001 - a broken cuDNN install is what this would report
        return None
    if v is None:
        return None
    if v >= 90000:  # cuDNN 9 encodes major * 10000 + minor * 100 + patch, cuDNN 8 major * 1000 + ...
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    return f"{v // 1000}.{v % 1000 // 100}.{v % 100}"


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": _cudnn_text(), "optuna": _package_version("optuna"), "numpy": _package_version("numpy"),
            "hpsearch": __version__}


def machine() -> dict:
    try:
        simd = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        simd = None
    return {"system": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu_capability": simd}


def cuda_devices() -> dict:
    """Is CUDA available (and if not, torch's own warning why), and each GPU it sees."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    info = {"available": available, "built_for": torch.version.cuda, "devices": []}
    if not available:
        why = next((first_line(w.message, 200) for w in caught), None)
        info["why_not"] = why or ("torch is built without CUDA" if torch.version.cuda is None else "no GPU visible")
        return info
    for i in range(torch.cuda.device_count()):
        info["devices"].append(_section(lambda i=i: _gpu(i)))
    return info


def _gpu(i: int) -> dict:
    p = torch.cuda.get_device_properties(i)
    free, total = torch.cuda.mem_get_info(i)
    return {"index": i, "name": p.name, "memory_gib": round(total / 2**30, 1), "free_gib": round(free / 2**30, 1),
            "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}


# ----------------------------------------------------------------------------------------------
# The CUDA-graph self-check


def graph_self_check(device: torch.device) -> dict:
    if device.type != "cuda":
        gpus = torch.cuda.is_available()
        message = NO_GPU if not gpus else "not checked: --device cpu; training runs eagerly on the CPU"
        return {"status": "no-gpu" if not gpus else "skipped", "message": message, "checks": []}
    return run_graph_checks(device, check_precisions(device))


def check_precisions(device: torch.device) -> list[str]:
    """fp32 everywhere; tf32 from Ampere (capability 8.0) on; bf16 where torch supports it."""
    major, _ = torch.cuda.get_device_capability(device)
    return ["fp32"] + (["tf32"] if major >= 8 else []) + (["bf16"] if torch.cuda.is_bf16_supported() else [])


def run_graph_checks(device: torch.device, precisions: list[str]) -> dict:
    """Each precision and family trained for an epoch: the trainer checks its first graph itself."""
    checks = []
    for precision in precisions:
        for family in CHECK_CONFIGS:
            checks.append({"precision": precision, "family": family,
                           **_section(lambda: _check_one(device, precision, family))})
    failed = [c for c in checks if not c.get("passed")]
    if not failed:
        message = "passed: training replays CUDA graphs"
    else:
        which = ", ".join(f"{c['precision']} {c['family']}" for c in failed)
        message = f"FAILED for {which}: those train eagerly (slower, still correct)"
    return {"status": "failed" if failed else "passed", "message": message, "checks": checks}


def _trainer(data: Dataset, precision: str, note) -> PopulationTrainer:
    return PopulationTrainer(data, precision=precision, note=note)


def _check_one(device: torch.device, precision: str, family: str) -> dict:
    data = synthetic_dataset(CHECK_IMAGES, device)
    notes: list[str] = []
    trainer = _trainer(data, precision, notes.append)
    for i, params in enumerate(CHECK_CONFIGS[family]):
        trainer.add(i, TrainConfig(epochs=2, **params))
    results = trainer.run_epoch()
    kind = (graphcheck.device_key(device), precision, family)
    verdict = graphcheck.verdicts().get(kind)
    if verdict is None:  # the trainer recorded no graph (CUDA graphs off)
        return {"passed": False, "max_rel_diff": None, "tolerance": None, "error": "no graph was recorded",
                "summary": "no graph was recorded", "path": results[0].train_path, "notes": notes}
    return {**verdict.to_dict(), "path": results[0].train_path, "notes": notes}


# ----------------------------------------------------------------------------------------------
# Throughput


def synthetic_dataset(n_train: int, device: torch.device, seed: int = 0) -> Dataset:
    """Random 28x28 images in [0, 1] and random labels of 10 classes, made on the CPU with a seed."""
    gen = torch.Generator().manual_seed(seed)
    n_val = max(10, n_train // 10)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(n, 784, generator=gen).to(device), torch.randint(0, 10, (n,), generator=gen).to(device)

    (tx, ty), (vx, vy), (sx, sy) = split(n_train), split(n_val), split(n_val)
    std, mean = torch.std_mean(tx)
    return Dataset(name="synthetic", classes=tuple(str(c) for c in range(10)), image_shape=(28, 28),
                   train_x=tx, train_y=ty, val_x=vx, val_y=vy, test_x=sx, test_y=sy, source="synthetic",
                   mean=float(mean), std=float(std))


def _throughput_data(device: torch.device, data_dir: str | None) -> tuple[Dataset, str]:
    """A real Fashion-MNIST subset where one is on disk (never downloaded), else synthetic images."""
    try:
        data = load_dataset("fashion-mnist", data_dir, device, subset=THROUGHPUT_IMAGES, download=False)
        return data, f"fashion-mnist subset from {data.source}"
    except HPSearchError as exc:
        return synthetic_dataset(SYNTHETIC_IMAGES, device), f"synthetic images (no real data: {first_line(exc, 120)})"


def measure_throughput(device: torch.device, data_dir: str | None, seconds: float) -> dict:
    """Samples/s of the default MLP trainer (one trial) over whole epochs, validation included,
    after one untimed epoch (allocation; on a GPU, graph capture and its check)."""
    data, source = _throughput_data(device, data_dir)
    config = TrainConfig(epochs=1_000_000)  # the default MLP: 3x128 relu, AdamW lr 1e-3, batch 128
    notes: list[str] = []
    trainer = PopulationTrainer(data, note=notes.append)
    trainer.add(0, config)
    path = trainer.run_epoch()[0].train_path
    epochs, start = 0, time.perf_counter()
    while 0 in trainer and (epochs == 0 or time.perf_counter() - start < seconds):
        path = trainer.run_epoch()[0].train_path
        epochs += 1
    elapsed = time.perf_counter() - start
    if epochs == 0:
        raise RuntimeError("the default MLP diverged in its first epoch")
    samples = epochs * len(data.train_y)
    return {"samples_per_second": round(samples / elapsed, 1), "seconds": round(elapsed, 2), "epochs": epochs,
            "train_images": len(data.train_y), "data": source, "device": str(device), "path": path,
            "model": "mlp 3x128 relu, adamw lr 1e-3, batch 128, one trial", "notes": notes}


# ----------------------------------------------------------------------------------------------
# Text


def format_report(report: dict) -> str:
    v, m, cuda = report["versions"], report["platform"], report["cuda"]
    cudnn = f", cuDNN {v['cudnn']}" if v["cudnn"] else ""
    lines = [
        "hpsearch doctor (paste this into a bug report)",
        f"hpsearch     {report['hpsearch']}",
        f"python       {v['python']} on {m['system']}",
        f"torch        {v['torch']} (CUDA {v['cuda'] or 'none'}{cudnn})",
        f"optuna       {v['optuna'] or 'not installed'}; numpy {v['numpy'] or 'not installed'}",
        f"cpu          {m['processor']}, {m['cpu_cores']} cores, torch uses {m['torch_threads']} threads"
        + (f", {m['cpu_capability']}" if m["cpu_capability"] else ""),
    ]
    if not cuda["available"]:
        lines.append(f"cuda         not available: {cuda['why_not']}")
    for gpu in cuda["devices"]:
        lines.append(f"gpu          {gpu['error']}" if "error" in gpu else
                     f"gpu {gpu['index']}        {gpu['name']}: {gpu['memory_gib']} GiB ({gpu['free_gib']} free), "
                     f"compute capability {gpu['capability']}, {gpu['multiprocessors']} SMs")
    check = report["graph_check"]
    lines.append(f"graph check  {check['message'] if 'message' in check else 'could not run: ' + check['error']}")
    lines += [f"  {c['precision']} {c['family']}: {_check_text(c)}" for c in check.get("checks", ())]
    lines.append(f"throughput   {_throughput_text(report['throughput'])}")
    return "\n".join(lines)


def _check_text(check: dict) -> str:
    if "passed" not in check:  # the check itself broke (a CUDA error, ...)
        return f"could not run: {check['error']}"
    return f"{'passed' if check['passed'] else 'FAILED'} ({check['summary']}); trains on {check['path']}"


def _throughput_text(t: dict) -> str:
    if "error" in t:
        return f"not measured: {t['error']}"
    return (f"{t['samples_per_second']:,.0f} samples/s on {t['device']} ({t['path']}): {t['model']}; "
            f"{t['epochs']} epochs of {t['train_images']:,} images of {t['data']} in {t['seconds']} s, "
            f"validation included")

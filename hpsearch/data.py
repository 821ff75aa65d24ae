"""Datasets: MNIST-format IDX files, found locally or downloaded once through torchvision.

The whole dataset is parsed once per process into uint8 tensors, split, moved to the training
device once and scaled to [0, 1] there. The trainer then indexes these tensors directly: no
Dataset objects, no DataLoader and no per-sample Python in the hot path.

Splits: train / validation come from the training file (stratified by class, seeded);
the test file is only ever used by the final evaluation in the report.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DATASET_NAMES
from .errors import DataError, first_line

# name -> (torchvision class name, class labels)
DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mnist": ("MNIST", tuple(str(d) for d in range(10))),
    "fashion-mnist": (
        "FashionMNIST",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "kmnist": ("KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
    "idx": ("", ()),
}
assert tuple(DATASETS) == DATASET_NAMES  # the torch-free list that config.py validates --dataset with

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Where hpsearch looks without --data-dir (Debian's dataset-* packages install here) and where
# torchvision downloads go.
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
DEFAULT_DOWNLOAD_DIR = Path("data")

_IDX_UBYTE = 0x08


# ----------------------------------------------------------------------------------------------
# IDX parsing


# What one IDX file may hold: 1 GiB is 20x Fashion-MNIST's training images. A header is checked
# against it before anything is allocated, and the body is read in chunks, so a forged header or
# a .gz that expands far beyond its header costs at most what the header says, never more.
MAX_IDX_BYTES = 1 << 30
_CHUNK = 16 << 20


def _idx_header(f, path: Path) -> tuple[int, ...]:
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{path} is not an IDX file: only {len(head)} bytes")
    zero, dtype, ndim = struct.unpack(">HBB", head)
    if zero != 0 or dtype != _IDX_UBYTE or not 1 <= ndim <= 3:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number {head.hex()})")
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", dims)
    size = math.prod(shape)  # Python ints: a forged 2**31 x 2**31 x 4 header does not wrap around
    if size > MAX_IDX_BYTES:
        raise DataError(f"{path}: its header says shape {shape} ({size:,} bytes); hpsearch reads IDX files "
                        f"of up to {MAX_IDX_BYTES >> 30} GiB")
    return shape


def _read_body(f, path: Path, shape: tuple[int, ...], header: int) -> bytearray:
    size = math.prod(shape)
    body = bytearray()
    while len(body) < size:
        chunk = f.read(min(_CHUNK, size - len(body)))
        if not chunk:
            raise DataError(f"{path} is truncated: {header + len(body)} bytes, header says {header + size} "
                            f"for shape {shape}")
        body += chunk
    if f.read(1):  # one byte past the header's size is enough to refuse: never decompress the rest
        raise DataError(f"{path} is longer than its header says ({header + size} bytes for shape {shape})")
    return body


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (raw or .gz) of unsigned bytes into an array; strict about its header."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            shape = _idx_header(f, path)
            body = _read_body(f, path, shape, 4 + 4 * len(shape))
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # zlib.error: a corrupt .gz body
        raise DataError(f"cannot read {path}: {exc}") from None
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def idx_dir_complete(directory: Path) -> bool:
    return directory.is_dir() and all(_find_file(directory, s) for s in IDX_FILES.values())


def load_idx_dir(directory: Path) -> dict[str, np.ndarray]:
    """Read the four MNIST-format files of a directory and check that they fit together."""
    missing = [s for s in IDX_FILES.values() if _find_file(directory, s) is None]
    if missing:
        raise DataError(f"{directory} lacks {', '.join(missing)} (raw or .gz)")
    arrays = {key: read_idx(_find_file(directory, stem)) for key, stem in IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{directory}: {split} images must be 3-D and labels 1-D, "
                            f"got {images.shape} and {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
        if len(images) == 0 or 0 in images.shape[1:]:
            raise DataError(f"{directory}: the {split} images file holds no images (shape {images.shape})")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(f"{directory}: train and test images differ in size")
    return arrays


# ----------------------------------------------------------------------------------------------
# Locating a dataset


def _candidate_dirs(name: str, data_dir: Path | None) -> list[Path]:
    tv_name = DATASETS[name][0]
    roots = [data_dir] if data_dir is not None else [DEFAULT_DOWNLOAD_DIR, SYSTEM_DATA_ROOT]
    dirs = []
    for root in roots:
        dirs.append(root)
        if name != "idx":
            dirs += [root / name, root / tv_name / "raw"]
    return dirs


def _download(name: str, root: Path) -> Path:
    """Download through torchvision into root/<Class>/raw; returns that directory."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, DATASETS[name][0])
    target = root / DATASETS[name][0] / "raw"
    created = [p for p in (root, root / DATASETS[name][0], target) if not p.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - torchvision raises many kinds; all mean "no download"
        for directory in reversed(created):  # leave no empty data/<Class>/raw behind
            try:
                directory.rmdir()
            except OSError:
                pass
        reason = first_line(exc, 160)
        raise DataError(
            f"{name} was not found locally and could not be downloaded ({reason}). "
            f"Fix: pass --data-dir DIR holding the four IDX files"
            + (", or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else "")
            + ", or run once with network access"
        ) from None
    return target


def locate(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return a directory holding the dataset's four IDX files, downloading it if allowed."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    root = Path(data_dir) if data_dir is not None else None
    if root is not None and not root.is_dir():
        raise DataError(f"--data-dir {root} is not a directory")
    for directory in _candidate_dirs(name, root):
        if idx_dir_complete(directory):
            return directory
    if root is not None and any(_find_file(root, s) for s in IDX_FILES.values()):
        load_idx_dir(root)  # partially present: report exactly which files are missing
    if name == "idx":
        where = root if root is not None else "the current directory"
        raise DataError(f"no MNIST-format IDX files in {where}; --dataset idx needs --data-dir DIR "
                        f"with {', '.join(IDX_FILES.values())} (raw or .gz)")
    if not download:
        raise DataError(f"{name} not found in {', '.join(map(str, _candidate_dirs(name, root)))}")
    return _download(name, root if root is not None else DEFAULT_DOWNLOAD_DIR)


# ----------------------------------------------------------------------------------------------
# Splits and device-resident tensors


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): `fraction` of every class held out, chosen with `seed`."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


@dataclass
class Dataset:
    """A dataset resident on one device. Images are float32 in [0, 1], flattened to [N, H*W]."""

    name: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str
    # Mean and std of training pixels, for the normalization that lives inside each model.
    mean: float
    std: float

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_features(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    def describe(self) -> dict:
        return {
            "dataset": self.name, "source": self.source, "train": len(self.train_y),
            "validation": len(self.val_y), "test": len(self.test_y), "classes": list(self.classes),
        }


def load_dataset(
    name: str = "fashion-mnist",
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    val_fraction: float = 0.1,
    subset: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> Dataset:
    """Load a dataset once, split it and put it on `device`.

    `subset` keeps a stratified sample of N images of the training file before the split (for
    quick CPU runs); validation is then `val_fraction` of that sample.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {val_fraction}")
    directory = locate(name, data_dir, download=download)
    arrays = load_idx_dir(directory)
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    num_classes = int(max(train_labels.max(), arrays["test_labels"].max())) + 1
    classes = DATASETS[name][1] if name != "idx" else tuple(str(c) for c in range(num_classes))
    if num_classes > len(classes):
        raise DataError(f"{directory}: labels go up to {num_classes - 1} but {name} has {len(classes)} classes")

    if subset is not None:
        if subset < 20 or subset > len(train_labels):
            raise DataError(f"--subset must be between 20 and {len(train_labels)}, got {subset}")
        if subset < len(train_labels):
            _, keep = stratified_split(train_labels, subset / len(train_labels), seed + 1)
            train_images, train_labels = train_images[keep], train_labels[keep]
    train_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
    if len(val_idx) == 0 or len(train_idx) == 0:  # e.g. as many classes as images: nothing to hold out per class
        raise DataError(f"{directory}: {len(train_labels)} training images in {len(np.unique(train_labels))} "
                        f"classes leave {len(val_idx)} for validation (--val-fraction {val_fraction}) and "
                        f"{len(train_idx)} for training; use more images per class or another --val-fraction")

    device = torch.device(device)

    def to_device(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Copy uint8 (4x less traffic than float), scale on the device.
        x = torch.from_numpy(np.array(images, copy=True)).to(device).reshape(len(images), -1)
        y = torch.from_numpy(labels.astype(np.int64)).to(device)
        return x.float().div_(255.0), y

    train_x, train_y = to_device(train_images[train_idx], train_labels[train_idx])
    val_x, val_y = to_device(train_images[val_idx], train_labels[val_idx])
    test_x, test_y = to_device(arrays["test_images"], arrays["test_labels"])
    std, mean = torch.std_mean(train_x)
    return Dataset(
        name=name, classes=classes, image_shape=tuple(train_images.shape[1:]),
        train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, test_x=test_x, test_y=test_y,
        source=str(directory), mean=float(mean), std=float(std),
    )

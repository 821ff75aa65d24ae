"""Checkpoints: a model's weights plus the JSON-able spec that rebuilds it, and nothing else.

A checkpoint is a plain dict saved with `torch.save`:

    {"format": "hpsearch-checkpoint", "version": 1,
     "spec": ModelSpec.to_dict(),          # family (mlp/cnn), architecture, input normalization
     "state_dict": {name: tensor},
     "classes": [label, ...], "image_shape": [H, W],
     "meta": {...}}                        # JSON-able: study, trial, params, accuracies, versions

Only tensors, strings, numbers, lists and dicts: it loads with `torch.load(weights_only=True)`,
so opening a checkpoint never runs code. Files are written through a temporary file and
`os.replace`, so a reader never sees half a checkpoint.

    >>> model = load_model("results/hpsearch/best_model.pt")   # doctest: +SKIP
    >>> logits = model(images)  # float images in [0, 1], [N, 1, 28, 28] (or [N, 784])
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import HPSearchError, first_line
from .models import ModelSpec, model_from_spec

FORMAT = "hpsearch-checkpoint"
VERSION = 1


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)  # replaces a symbolic link itself, never writes through it
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None:  # a full disk: name the file, not the temporary
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    return path


def checkpoint_dict(model: nn.Module, classes: list[str] | tuple[str, ...] | None = None,
                    image_shape: tuple[int, int] | None = None, meta: dict | None = None) -> dict:
    spec: ModelSpec = model.spec
    if classes is None:
        classes = [str(c) for c in range(spec.num_classes)]
    if len(classes) != spec.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {spec.num_classes} outputs")
    if image_shape is None:
        image_shape = spec.image_hw
    meta = dict(meta or {})
    try:  # only plain data: weights_only loading accepts it, and it can go into JSON
        meta = json.loads(json.dumps(meta, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint meta must be JSON-able: {exc}") from None
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT, "version": VERSION, "spec": spec.to_dict(), "state_dict": state,
        "classes": [str(c) for c in classes], "image_shape": [int(image_shape[0]), int(image_shape[1])],
        "meta": meta,
    }


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *,
                    classes: list[str] | tuple[str, ...] | None = None,
                    image_shape: tuple[int, int] | None = None, meta: dict | None = None) -> Path:
    """Write `model` (a `NeuralNetwork` or `ConvNet`) and its spec to `path` atomically; returns the path."""
    ckpt = checkpoint_dict(model, classes, image_shape, meta)
    return atomic_write(path, lambda tmp: write_checkpoint_dict(ckpt, tmp))


def write_checkpoint_dict(ckpt: dict, path: str | os.PathLike) -> None:
    # Through a file object: torch.save(ckpt, path) names the archive's folder after the (temporary)
    # file, so the same checkpoint would give different bytes every time.
    with open(path, "wb") as f:
        torch.save(ckpt, f)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint dict (weights only; never unpickles code)."""
    path = Path(path)
    if not path.exists():
        raise HPSearchError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise HPSearchError(f"checkpoint {path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise HPSearchError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise HPSearchError(f"{path} is not an hpsearch checkpoint (not a PyTorch file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "pickle protocol 4": the refusal below says enough
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
            raise HPSearchError(f"{path} is not an hpsearch checkpoint: it holds Python objects that "
                                f"would run code to load (refused; only weights_only files are read)") from None
        raise HPSearchError(f"{path} is not an hpsearch checkpoint ({first_line(exc, 160)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError,
            TypeError, IndexError) as exc:
        raise HPSearchError(f"{path} is not an hpsearch checkpoint ({first_line(exc, 160)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise HPSearchError(f"{path} is not an hpsearch checkpoint (no \"format\": \"{FORMAT}\" entry; "
                            f"make one with `hpsearch report` or hpsearch.checkpoint.save_checkpoint)")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise HPSearchError(f"{path} is checkpoint format version {version!r}; this hpsearch reads "
                            f"version {VERSION} or older: upgrade hpsearch")
    for key, kind in (("spec", dict), ("state_dict", dict), ("classes", list)):
        if not isinstance(ckpt.get(key), kind):
            raise HPSearchError(f"{path} is a damaged hpsearch checkpoint: {key!r} is missing or not a {kind.__name__}")
    ckpt.setdefault("meta", {})
    ckpt.setdefault("image_shape", None)
    return ckpt


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> nn.Module:
    """The network of either family; checkpoints from before the CNN family have no "family"
    in their spec and rebuild as the MLP they are."""
    try:
        spec = ModelSpec.from_dict(ckpt["spec"])
        model = model_from_spec(spec)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise HPSearchError(f"{source} is a damaged hpsearch checkpoint: {first_line(exc, 160)}") from None
    if len(ckpt["classes"]) != spec.num_classes:
        raise HPSearchError(f"{source} is a damaged hpsearch checkpoint: {len(ckpt['classes'])} class names "
                            f"for {spec.num_classes} outputs")
    return model.eval()


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(eval-mode model, checkpoint dict) from a checkpoint file."""
    ckpt = read_checkpoint(path, map_location)
    model = model_from_checkpoint(ckpt, str(path)).to(map_location)
    return model, ckpt


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """An eval-mode model from a checkpoint: float images in [0, 1], [N, 1, H, W] -> logits [N, C].

    It carries what it was trained on: `model.classes` (a tuple of str, logit i is classes[i]) and
    `model.image_shape` ((H, W))."""
    model, ckpt = load_checkpoint(path, map_location)
    model.classes = tuple(str(c) for c in ckpt["classes"])
    model.image_shape = image_shape_of(ckpt)
    return model


def image_shape_of(ckpt: dict) -> tuple[int, int]:
    shape = ckpt.get("image_shape")
    if isinstance(shape, list) and len(shape) == 2:
        return int(shape[0]), int(shape[1])
    n = int(ckpt["spec"].get("in_features", 784))
    side = int(round(n ** 0.5))
    return (side, side)

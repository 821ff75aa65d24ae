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
from .specs import check_image_shape, spec_from_stored

FORMAT = "hpsearch-checkpoint"
VERSION = 1
# torch.save stores a checkpoint's zip entries uncompressed (they unpack to about the file's size),
# and float weights hardly compress; entries that unpack to far more are a decompression bomb.
MAX_UNPACK_RATIO = 16


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
    _check_unpacked_size(path)
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


def _check_unpacked_size(path: Path) -> None:
    """Refuse a zip whose entries unpack to much more than the file: torch.load would allocate it all."""
    try:
        with zipfile.ZipFile(path) as z:
            unpacked = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (a legacy pickle), or a broken one: torch.load says what is wrong
    size = path.stat().st_size
    if unpacked > MAX_UNPACK_RATIO * size + (1 << 20):
        raise HPSearchError(f"{path} is not an hpsearch checkpoint: its {size:,}-byte archive unpacks to "
                            f"{unpacked:,} bytes (refused: a decompression bomb)")


def checked_spec(ckpt: dict, source: str = "checkpoint") -> ModelSpec:
    """The checkpoint's spec, once everything the file's header claims fits what it stores; a
    one-line HPSearchError otherwise. Nothing is allocated here beyond what the file already holds."""
    def damaged(why: str) -> HPSearchError:
        return HPSearchError(f"{source} is a damaged hpsearch checkpoint: {why}")

    try:
        spec = spec_from_stored(ckpt["spec"])
        shape = ckpt.get("image_shape")
        if shape is not None and check_image_shape(shape) != spec.image_hw and (  # old MLPs: in_features only
                (spec.height and spec.width) or shape[0] * shape[1] != spec.in_features):
            raise ValueError(f"image_shape {shape} is not the spec's {spec.image_hw[0]}x{spec.image_hw[1]} images")
    except (TypeError, ValueError, KeyError) as exc:
        raise damaged(first_line(exc, 160)) from None
    if len(ckpt["classes"]) != spec.num_classes:
        raise damaged(f"{len(ckpt['classes'])} class names for {spec.num_classes} outputs")
    problem = _state_dict_problem(spec, ckpt["state_dict"])
    if problem:
        raise damaged(problem)
    return spec


def _is_batch_count(name: str, value: torch.Tensor) -> bool:
    """BatchNorm1d's one integer: the batches it has seen (a scalar int64)."""
    return name.endswith(".num_batches_tracked") and value.dtype == torch.int64 and value.dim() == 0


def _state_dict_problem(spec: ModelSpec, state: dict) -> str | None:
    """What is wrong with the stored tensors for `spec`'s network, or None. Compared before building
    it: the parameter count the spec implies, then each name and shape against the network built on
    the meta device (shapes only, no memory)."""
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided
               and (v.is_floating_point() or _is_batch_count(k, v)) for k, v in state.items()):
        return "its state_dict holds something other than named float tensors"
    with torch.device("meta"):
        model = model_from_spec(spec)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    buffers = {k for k, _ in model.named_buffers()}  # the input normalization's mean and std
    stored = sum(v.numel() for k, v in state.items() if k not in buffers)
    if stored != spec.param_count():
        return f"its spec ({_describe(spec)}) implies {spec.param_count():,} parameters but it stores {stored:,}"
    for name in sorted(expected.keys() | state.keys()):
        if name not in state or name not in expected:
            return f"tensor {name!r} is {'missing' if name not in state else 'not part of its spec network'}"
        if tuple(state[name].shape) != expected[name]:
            return f"tensor {name!r} is {list(state[name].shape)} where its spec makes {list(expected[name])}"
    for name, value in (("mean", spec.mean), ("std", spec.std)):  # what every input is normalized with
        if float(state[f"normalize.{name}"]) != float(torch.tensor(value, dtype=torch.float32)):
            return f"its stored input {name} {float(state[f'normalize.{name}'])} is not its spec's {value}"
    # A view with zero strides over a few stored bytes would expand to its full size when copied in.
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in state.values()}
    if sum(v.numel() * v.element_size() for v in state.values()) > sum(storages.values()):
        return "its tensors claim more bytes than the file stores"
    return None


def _describe(spec: ModelSpec) -> str:
    conv = f"cnn {spec.conv_blocks}x{spec.channels}c k{spec.kernel_size} + " if spec.family == "cnn" else "mlp "
    return f"{conv}{spec.num_layers}x{spec.layer_size} on {spec.image_hw[0]}x{spec.image_hw[1]}"


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> nn.Module:
    """The network of either family; checkpoints from before the CNN family have no "family"
    in their spec and rebuild as the MLP they are. Checked first (`checked_spec`); then built on
    the meta device and given uninitialized memory that the stored tensors overwrite, so loading
    costs the weights' size once, with no random initialization."""
    spec = checked_spec(ckpt, source)
    try:
        with torch.device("meta"):
            model = model_from_spec(spec)
        model = model.to_empty(device="cpu")
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise HPSearchError(f"{source} is a damaged hpsearch checkpoint: {first_line(exc, 160)}") from None
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
    """(H, W) the model takes: the stored image_shape, or (older checkpoints) the spec's own."""
    shape = ckpt.get("image_shape")
    if isinstance(shape, list) and len(shape) == 2:
        return int(shape[0]), int(shape[1])
    return ModelSpec.from_dict(ckpt["spec"]).image_hw

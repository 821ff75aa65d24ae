"""Exporting a checkpoint (TorchScript, ONNX) and predicting the class of image files.

Exports take what the checkpoint's model takes: float images in [0, 1] shaped [N, 1, H, W]
(input "images", any N), and return logits [N, classes] (output "logits"). Normalization is
inside the model, so nothing else has to travel with it; the class names do anyway (TorchScript:
the extra file `hpsearch.json`; ONNX: the metadata entry `hpsearch`).

Images for `predict` are read with Pillow, any size and mode (palette, 16-bit, RGB, alpha:
composited onto white), turned to grayscale in [0, 1], and then:

- an image already the model's size (28x28) is used as it is, as the dataset's own images are;
- any other size is brought into the dataset's format. `mnist` (MNIST, KMNIST, idx) is the MNIST
  recipe: the background level (median of the border) is removed, the bounding box of the ink is
  scaled to fit 20x20 with its aspect ratio kept, and placed in 28x28 so that its centre of mass
  is in the middle. `fit` (Fashion-MNIST's recipe) scales the bounding box so its longer side is
  28 and centres it. `auto` picks by the checkpoint's dataset.

The datasets are light-on-dark: pass `invert=True` (`--invert`) for dark ink on a light
background (scans, photos of paper, drawings on white).
"""

from __future__ import annotations

import json
import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write, image_shape_of, load_checkpoint, write_checkpoint_dict
from .errors import HPSearchError, first_line

FORMATS = ("pt", "torchscript", "onnx")
RESIZE_MODES = ("auto", "mnist", "fit")
ONNX_OPSET = 17


# ----------------------------------------------------------------------------------------------
# Export


def _metadata(ckpt: dict) -> str:
    return json.dumps({"format": "hpsearch-export", "classes": ckpt["classes"], "image_shape": list(image_shape_of(ckpt)),
                       "spec": ckpt["spec"], "input": "float images in [0, 1], [N, 1, H, W]",
                       "output": "logits [N, classes]", "meta": ckpt.get("meta", {})})


def export_model(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike) -> Path:
    """Write the checkpoint's model to `out` as pt (a checked copy), torchscript or onnx."""
    if fmt not in FORMATS:
        raise HPSearchError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise HPSearchError(f"--out {out} is a directory; give a file path")
    model, ckpt = load_checkpoint(checkpoint)
    H, W = image_shape_of(ckpt)
    example = torch.rand(2, 1, H, W)
    try:
        if fmt == "pt":
            return atomic_write(out, lambda tmp: write_checkpoint_dict(ckpt, tmp))
        if fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted = torch.jit.script(model)
            extra = {"hpsearch.json": _metadata(ckpt)}

            # Serialize in memory, write with Python I/O: torch.jit.save straight to a file aborts
            # the whole process (a C++ exception) when the disk fills up.
            buffer = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(scripted, buffer, _extra_files=extra)
            return atomic_write(out, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
        return atomic_write(out, lambda tmp: _export_onnx(model, example, tmp, _metadata(ckpt)))
    except OSError as exc:
        raise HPSearchError(f"cannot write {out}: {exc.strerror or exc}") from None


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str, metadata: str) -> None:
    try:
        import onnx
    except ImportError:
        raise HPSearchError("--format onnx needs the onnx package: pip install 'hpsearch[export]' "
                            "(onnx, and onnxruntime to run the exported model)") from None
    kwargs = dict(input_names=["images"], output_names=["logits"], opset_version=ONNX_OPSET,
                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript-based exporter: works offline with just `onnx` (the dynamo exporter,
            # torch's default since 2.9, also needs `onnxscript`).
            torch.onnx.export(model, (example,), path, dynamo=False, **kwargs)
        except Exception as legacy_exc:  # noqa: BLE001 - e.g. a torch without the legacy exporter
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise HPSearchError(f"ONNX export failed ({first_line(legacy_exc, 160)}); "
                                    f"installing onnxscript enables torch's other exporter") from None
            torch.onnx.export(model, (example,), path, dynamo=True, input_names=["images"],
                              output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=False)
    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "hpsearch", metadata
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


# ----------------------------------------------------------------------------------------------
# Reading images


def _to_gray(path: Path) -> np.ndarray:
    """Any image file -> float64 [H, W] in [0, 1] (white = 1), or a one-line HPSearchError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise HPSearchError(f"image {path} does not exist")
    if not path.is_file():
        raise HPSearchError(f"image {path} is not a file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode.startswith("I;16"):
                return np.clip(np.asarray(im, dtype=np.float64) / 65535.0, 0, 1)
            if mode == "I":
                a = np.asarray(im, dtype=np.float64)
                return np.clip(a / (65535.0 if a.max() > 255 else 255.0), 0, 1)
            if mode == "F":
                a = np.nan_to_num(np.asarray(im, dtype=np.float64))
                return np.clip(a / 255.0 if a.max() > 1.0 else a, 0, 1)
            if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            return np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    except UnidentifiedImageError:
        raise HPSearchError(f"{path} is not an image (Pillow cannot identify its format)") from None
    except Image.DecompressionBombError:
        raise HPSearchError(f"{path} is too large to be read safely as an image") from None
    except (OSError, SyntaxError, ValueError, TypeError) as exc:
        raise HPSearchError(f"{path} is not a readable image ({first_line(exc, 160)})") from None


def _resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(a.astype(np.float32), mode="F")
    return np.asarray(im.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float64)


def to_dataset_format(gray: np.ndarray, image_shape: tuple[int, int] = (28, 28), mode: str = "mnist") -> np.ndarray:
    """A light-on-dark grayscale image of any size -> image_shape, the MNIST (or `fit`) way."""
    H, W = image_shape
    if gray.shape == (H, W):
        return gray
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    a = np.clip((gray - background) / max(1.0 - background, 1e-6), 0, 1)
    ink = a > 0.1
    if ink.any():
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        a = a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    box_h, box_w = (H - 8, W - 8) if mode == "mnist" else (H, W)
    scale = min(box_h / a.shape[0], box_w / a.shape[1])
    h = max(1, min(box_h, round(a.shape[0] * scale)))
    w = max(1, min(box_w, round(a.shape[1] * scale)))
    small = np.clip(_resize(a, h, w), 0, 1)
    if mode == "mnist" and small.sum() > 0:
        r, c = np.indices(small.shape)
        com_r, com_c = (r * small).sum() / small.sum(), (c * small).sum() / small.sum()
        top, left = round((H - 1) / 2 - com_r), round((W - 1) / 2 - com_c)
    else:
        top, left = (H - h) // 2, (W - w) // 2
    top, left = int(min(max(top, 0), H - h)), int(min(max(left, 0), W - w))
    out = np.zeros((H, W))
    out[top:top + h, left:left + w] = small
    return out


def load_image(path: str | os.PathLike, image_shape: tuple[int, int] = (28, 28), invert: bool = False,
               mode: str = "mnist") -> torch.Tensor:
    """An image file as the model's input: float32 [1, H, W] in [0, 1], light on dark."""
    gray = _to_gray(Path(path))
    if invert:
        gray = 1.0 - gray
    return torch.from_numpy(to_dataset_format(gray, image_shape, mode)).float().unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Predicting


@dataclass
class Prediction:
    image: str
    index: int
    label: str
    probability: float
    top: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def resize_mode_for(ckpt: dict, requested: str = "auto") -> str:
    if requested not in RESIZE_MODES:
        raise HPSearchError(f"unknown --resize {requested!r}; choose one of {', '.join(RESIZE_MODES)}")
    if requested != "auto":
        return requested
    return "fit" if ckpt.get("meta", {}).get("dataset") == "fashion-mnist" else "mnist"


@torch.no_grad()
def predict_images(paths: list[str | os.PathLike], checkpoint: str | os.PathLike, invert: bool = False,
                   resize: str = "auto", top: int = 3) -> list[Prediction]:
    """Classify image files with a checkpoint's model: the class and its probability for each."""
    if not paths:
        raise HPSearchError("give at least one image file")
    model, ckpt = load_checkpoint(checkpoint)
    shape = image_shape_of(ckpt)
    mode = resize_mode_for(ckpt, resize)
    x = torch.stack([load_image(p, shape, invert, mode) for p in paths])
    probs = model(x).float().softmax(-1)
    classes = ckpt["classes"]
    k = max(1, min(top, len(classes)))
    values, indices = probs.topk(k, dim=-1)
    out = []
    for path, vals, idx in zip(paths, values.tolist(), indices.tolist()):
        out.append(Prediction(str(path), idx[0], classes[idx[0]], vals[0],
                              [{"index": i, "label": classes[i], "probability": v} for i, v in zip(idx, vals)]))
    return out

"""Exporting a checkpoint (TorchScript, ONNX) and predicting the class of image files.

Exports take what the checkpoint's model takes: float images in [0, 1] shaped [N, 1, H, W]
(input "images", any N), and return logits [N, classes] (output "logits"). Normalization is
inside the model, so nothing else has to travel with it; the class names do anyway (TorchScript:
the extra file `hpsearch.json`; ONNX: the metadata entry `hpsearch`), so `predict` takes an
export as well as a checkpoint.

Images for `predict` are read with Pillow, any size and mode (palette, 16-bit, RGB; transparent
ones over a background that contrasts with their visible pixels), turned to grayscale in [0, 1],
and then:

- the datasets are light-on-dark: an image whose border is mostly light (median above mid-grey:
  scans, photos on paper or a white table) is inverted. `invert=True/False` (`--invert`,
  `--no-invert`) forces it either way;
- an image already the model's size (28x28) is used as it is, as the dataset's own images are;
- any other size is brought into the dataset's format. `mnist` (MNIST, KMNIST, idx) is the MNIST
  recipe: the background level (median of the border) is removed, the bounding box of the ink is
  scaled to fit 20x20 with its aspect ratio kept, and placed in 28x28 so that its centre of mass
  is in the middle. `fit` (Fashion-MNIST's recipe) scales the bounding box so its longer side is
  28 and centres it. `auto` picks by the checkpoint's dataset. Ink is what stands out of the
  background by more than its noise, so a noisy photo's background does not stretch the box.

An image left (nearly) flat by the conversion gets a warning with its prediction.
"""

from __future__ import annotations

import json
import io
import os
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import atomic_write, image_shape_of, load_checkpoint, write_checkpoint_dict
from .errors import HPSearchError, first_line
from .specs import check_image_shape

FORMATS = ("pt", "torchscript", "onnx")
RESIZE_MODES = ("auto", "mnist", "fit")
ONNX_OPSET = 17
BLANK_RANGE = 0.05  # max - min of a converted image below this: nothing to classify
# Largest image `predict` decodes: 24 megapixels, a 6000x4000 camera photo (twice a 12 MP phone's).
# Conversion costs ~25-40 bytes a pixel (float64 grey, background and ink passes), so ~1 GB at
# most, for a 28x28 input; a tiny PNG can declare far more (13000x13000 took 4.4 GB).
MAX_IMAGE_PIXELS = 24_000_000


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


def _composite_alpha(im) -> np.ndarray:
    """A transparent image -> gray in [0, 1]: its pixels over a background that contrasts with them."""
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    alpha = rgba[..., 3]
    gray = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # Pillow's "L" weights
    # The visible pixels are the object: dark ones go over white (then auto-invert flips them to the
    # dataset's light-on-dark), light ones over black. Fully transparent: all white, i.e. blank.
    ink = float((gray * alpha).sum() / alpha.sum()) if alpha.sum() > 0 else 0.0
    back = 1.0 if ink < 0.5 else 0.0
    return (gray * alpha + back * (1.0 - alpha)).astype(np.float64)


def _open_image(path: Path):
    """Image.open (which reads only the header), refusing sizes over MAX_IMAGE_PIXELS before decoding."""
    from PIL import Image

    with warnings.catch_warnings():
        # Pillow warns on its own (higher) limit; the refusal below says it in one line instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        im.close()
        raise HPSearchError(f"image {path} is too large: {w}x{h} pixels, over predict's limit of "
                            f"{MAX_IMAGE_PIXELS:,} (downscale it)")
    return im


def _to_gray(path: Path) -> np.ndarray:
    """Any image file -> float64 [H, W] in [0, 1] (white = 1), or a one-line HPSearchError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise HPSearchError(f"image {path} does not exist")
    if not path.is_file():
        raise HPSearchError(f"image {path} is not a file")
    try:
        with _open_image(path) as im:
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
                return _composite_alpha(im)
            return np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    except UnidentifiedImageError:
        raise HPSearchError(f"{path} is not an image (Pillow cannot identify its format)") from None
    except Image.DecompressionBombError:  # Pillow's own limit (over 179 megapixels) refused it first
        raise HPSearchError(f"image {path} is too large: far over predict's limit of {MAX_IMAGE_PIXELS:,} "
                            f"pixels (downscale it)") from None
    except (OSError, SyntaxError, ValueError, TypeError) as exc:
        raise HPSearchError(f"{path} is not a readable image ({first_line(exc, 160)})") from None


def _border(gray: np.ndarray) -> np.ndarray:
    """The pixels of a band round the edge (1 px on 28x28, ~3% of the side on photos)."""
    w = max(1, min(gray.shape) // 32)
    return np.concatenate([gray[:w].ravel(), gray[-w:].ravel(), gray[:, :w].ravel(), gray[:, -w:].ravel()])


def _background(gray: np.ndarray) -> tuple[float, float]:
    """(level, noise) of the background: the border's median and its robust spread (MAD as a sigma)."""
    border = _border(gray)
    level = float(np.median(border))
    return level, 1.4826 * float(np.median(np.abs(border - level)))


def has_light_background(gray: np.ndarray) -> bool:
    """Dark ink on a light background (scans, photos on paper): the border is mostly lighter than
    mid-grey. The median, so noise, JPEG ringing and an object touching an edge do not decide it."""
    return _background(gray)[0] > 0.5


def _resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(a.astype(np.float32), mode="F")
    return np.asarray(im.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float64)


def _ink_box(a: np.ndarray, noise: float) -> np.ndarray:
    """`a` cropped to the bounding box of its ink (the whole of `a` if it has none)."""
    ink = a > max(0.1, 4.0 * noise)
    if noise > 0:
        # A noisy background has stray bright pixels everywhere: a row or column needs two to count.
        rows, cols = np.flatnonzero(ink.sum(1) >= 2), np.flatnonzero(ink.sum(0) >= 2)
    else:
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if rows.size and cols.size:
        return a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return a


def to_dataset_format(gray: np.ndarray, image_shape: tuple[int, int] = (28, 28), mode: str = "mnist") -> np.ndarray:
    """A light-on-dark grayscale image of any size -> image_shape, the MNIST (or `fit`) way."""
    H, W = image_shape
    if gray.shape == (H, W):
        return gray
    background, noise = _background(gray)
    span = max(1.0 - background, 1e-6)
    a = _ink_box(np.clip((gray - background) / span, 0, 1), noise / span)
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


def prepare_image(path: str | os.PathLike, image_shape: tuple[int, int] = (28, 28), invert: bool | None = None,
                  mode: str = "mnist") -> tuple[torch.Tensor, bool]:
    """(the model's input, float32 [1, H, W] light on dark; whether it was inverted).

    invert=None decides by the background (`has_light_background`); True or False force it."""
    gray = _to_gray(Path(path))
    inverted = has_light_background(gray) if invert is None else bool(invert)
    if inverted:
        gray = 1.0 - gray
    return torch.from_numpy(to_dataset_format(gray, image_shape, mode)).float().unsqueeze(0), inverted


def load_image(path: str | os.PathLike, image_shape: tuple[int, int] = (28, 28), invert: bool | None = None,
               mode: str = "mnist") -> torch.Tensor:
    """An image file as the model's input: float32 [1, H, W] in [0, 1], light on dark."""
    return prepare_image(path, image_shape, invert, mode)[0]


def blank_warning(x: torch.Tensor) -> str | None:
    """A warning when a converted image is (nearly) one flat value: its class means nothing."""
    if float(x.max() - x.min()) < BLANK_RANGE:
        return "blank after conversion (no ink left: an empty or fully transparent image?); its class means nothing"
    return None


# ----------------------------------------------------------------------------------------------
# Models to predict with: checkpoints, TorchScript and ONNX exports


@dataclass
class Classifier:
    """What `predict` needs from a model file: images [N, 1, H, W] -> logits, and its metadata."""
    run: Callable[[torch.Tensor], torch.Tensor]
    classes: tuple[str, ...]
    image_shape: tuple[int, int]
    dataset: str | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def _export_info(text: str, path: Path, kind: str) -> tuple[tuple[str, ...], tuple[int, int], str | None]:
    """(classes, image shape, dataset) from an export's embedded `_metadata`, or a one-line error."""
    try:
        info = json.loads(text) if text else None
        if not isinstance(info["classes"], list):
            raise TypeError("classes is not a list")
        classes = tuple(str(c) for c in info["classes"])
        shape = info["image_shape"]
        meta = info.get("meta") if isinstance(info.get("meta"), dict) else {}
    except (TypeError, ValueError, KeyError, AttributeError):
        raise HPSearchError(f"{path} is a {kind} file without hpsearch's metadata (class names, image size): "
                            f"make it with `hpsearch export`, or pass the .pt checkpoint") from None
    try:  # the size every image is converted to: a header's [100000, 100000] must not allocate it
        height, width = check_image_shape(shape)
    except ValueError as exc:
        raise HPSearchError(f"{path} is a damaged {kind} export: {first_line(exc, 160)}") from None
    return classes, (height, width), meta.get("dataset")


def _model_kind(path: Path) -> str:
    """Which loader: onnx, torchscript, or checkpoint (which also reports missing and foreign files)."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (OSError, zipfile.BadZipFile):
            return "checkpoint"
        # torch.jit.save's archives carry their code; torch.save's hold only data.
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
    return "checkpoint"


def _load_torchscript(path: Path) -> Classifier:
    extra = {"hpsearch.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice (torch >= 2.14)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError and others for foreign files
        raise HPSearchError(f"{path} is not a readable TorchScript file ({first_line(exc, 160)})") from None
    classes, shape, dataset = _export_info(extra["hpsearch.json"], path, "TorchScript")
    return Classifier(module.eval(), classes, shape, dataset)


def _load_onnx(path: Path) -> Classifier:
    if not path.is_file():
        raise HPSearchError(f"checkpoint {path} does not exist" if not path.exists() else f"checkpoint {path} is not a file")
    try:
        import onnxruntime as ort
    except ImportError:
        raise HPSearchError(f"{path} is an ONNX file: predicting with it needs onnxruntime "
                            f"(pip install 'hpsearch[export]'), or pass the .pt checkpoint") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings would go to stderr
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        raise HPSearchError(f"{path} is not a readable ONNX model ({first_line(exc, 160)})") from None
    text = session.get_modelmeta().custom_metadata_map.get("hpsearch", "")
    classes, shape, dataset = _export_info(text, path, "ONNX")
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy().astype(np.float32)})[0])

    return Classifier(run, classes, shape, dataset)


def load_classifier(path: str | os.PathLike) -> Classifier:
    """A checkpoint (.pt), or an export of one: TorchScript (any name) or ONNX (.onnx, with onnxruntime)."""
    path = Path(path)
    kind = _model_kind(path)
    if kind == "onnx":
        return _load_onnx(path)
    if kind == "torchscript":
        return _load_torchscript(path)
    model, ckpt = load_checkpoint(path)
    meta = ckpt["meta"] if isinstance(ckpt["meta"], dict) else {}
    return Classifier(model, tuple(ckpt["classes"]), image_shape_of(ckpt), meta.get("dataset"))


# ----------------------------------------------------------------------------------------------
# Predicting


@dataclass
class Prediction:
    """One image's result. `error` set: the file could not be read, and nothing else is."""
    image: str
    index: int | None = None
    label: str | None = None
    probability: float | None = None
    top: list[dict] = field(default_factory=list)
    inverted: bool = False
    warning: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        """JSON: image, index, label, probability, top, inverted (and warning if any); or image, error."""
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        d = asdict(self)
        del d["error"]
        if d["warning"] is None:
            del d["warning"]
        return d

    def text_line(self, top: int = 1, mark_inverted: bool = False) -> str:
        """image, label, probability, tab-separated; with top > 1, the next classes and theirs after them."""
        fields = [self.image] + [f"{t['label']}\t{t['probability']:.4f}" for t in self.top[:max(1, top)]]
        if mark_inverted and self.inverted:
            fields.append("(auto-inverted)")
        return "\t".join(fields)


def resize_mode_for(dataset: str | None, requested: str = "auto") -> str:
    if requested not in RESIZE_MODES:
        raise HPSearchError(f"unknown --resize {requested!r}; choose one of {', '.join(RESIZE_MODES)}")
    if requested != "auto":
        return requested
    return "fit" if dataset == "fashion-mnist" else "mnist"


def _read_images(paths, shape, invert, mode, errors: str) -> tuple[list[Prediction], list[torch.Tensor]]:
    results, inputs = [], []
    for p in paths:
        try:
            x, inverted = prepare_image(p, shape, invert, mode)
        except HPSearchError as exc:
            if errors == "raise":
                raise
            results.append(Prediction(str(p), error=str(exc)))
            continue
        inputs.append(x)
        results.append(Prediction(str(p), inverted=inverted, warning=blank_warning(x)))
    return results, inputs


@torch.no_grad()
def predict_images(paths: list[str | os.PathLike], checkpoint: str | os.PathLike, invert: bool | None = None,
                   resize: str = "auto", top: int = 3, errors: str = "raise") -> list[Prediction]:
    """Classify image files with a model file (see `load_classifier`): the class and its probability
    for each, in order.

    invert: None inverts images with a light background, True/False force it. errors="raise" stops
    at the first unreadable image (an HPSearchError); "report" returns it with `error` set instead.
    """
    if not paths:
        raise HPSearchError("give at least one image file")
    if errors not in ("raise", "report"):
        raise ValueError(f"errors must be 'raise' or 'report', not {errors!r}")
    clf = load_classifier(checkpoint)
    results, inputs = _read_images(paths, clf.image_shape, invert, resize_mode_for(clf.dataset, resize), errors)
    if not inputs:
        return results
    probs = clf(torch.stack(inputs)).float().softmax(-1)
    if probs.shape[-1] != len(clf.classes):
        raise HPSearchError(f"{checkpoint} gives {probs.shape[-1]} outputs for {len(clf.classes)} class names")
    values, indices = probs.topk(max(1, min(top, len(clf.classes))), dim=-1)
    read = [r for r in results if r.error is None]
    for r, vals, idx in zip(read, values.tolist(), indices.tolist()):
        r.index, r.label, r.probability = idx[0], clf.classes[idx[0]], vals[0]
        r.top = [{"index": i, "label": clf.classes[i], "probability": v} for i, v in zip(idx, vals)]
    return results

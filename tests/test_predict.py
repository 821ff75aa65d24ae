"""`hpsearch predict` on images that are not the dataset's: photos on a light, noisy background,
transparent images, unreadable files among good ones, exports as the model; and `--top` in text."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_dir):
    """A small MLP right on ~85% of Fashion-MNIST's test split, saved as a checkpoint (seconds on a CPU)."""
    from hpsearch import TrainConfig, load_dataset, train_one
    from hpsearch.checkpoint import save_checkpoint

    data = load_dataset("fashion-mnist", fashion_dir, "cpu", subset=10000, seed=0)
    result = train_one(TrainConfig(num_layers=2, layer_size=128, lr=2e-3, batch_size=128, epochs=3, seed=0), data)
    tmp = tmp_path_factory.mktemp("predict")
    path = save_checkpoint(tmp / "model.pt", result.model, classes=data.classes, image_shape=data.image_shape,
                           meta={"dataset": data.name})
    with torch.no_grad():
        conf, pred = result.model(data.test_x.view(-1, 1, 28, 28)).softmax(-1).max(-1)
    images = (data.test_x.view(-1, 28, 28).numpy() * 255).round().astype(np.uint8)
    return {"tmp": tmp, "path": str(path), "data": data, "pred": pred, "conf": conf, "images": images}


def _right(trained, n):
    """Indices of n test images the model classifies right (surely, where it can), of n different classes."""
    data, pred, conf = trained["data"], trained["pred"], trained["conf"]
    chosen = []
    for c in range(n):
        right = (data.test_y == c) & (pred == c)
        sure = torch.nonzero(right & (conf > 0.8)).flatten()
        chosen.append(int(sure[0] if len(sure) else torch.nonzero(right).flatten()[0]))
    return chosen


def _photo(img: np.ndarray, rng, size=64, noise=0.06) -> Image.Image:
    """A dataset image as a photo of a dark object on a light, noisy background (JPEG-like)."""
    ink = np.asarray(Image.fromarray(img).resize((44, 44), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    out = np.clip(0.82 + rng.normal(0, noise, (size, size)), 0, 1)
    top, left = (size - 44) // 2 + 2, (size - 44) // 2 - 3  # a little off-centre
    region = out[top:top + 44, left:left + 44]
    out[top:top + 44, left:left + 44] = region * (1 - ink) + 0.05 * ink
    return Image.fromarray((out * 255).round().astype(np.uint8)).convert("RGB")


def _png(img, path, mode=None):
    Image.fromarray(img, mode=mode).save(path)
    return str(path)


def test_load_model_carries_its_classes(trained):
    from hpsearch import load_model

    model = load_model(trained["path"])
    assert model.classes == tuple(trained["data"].classes) and model.classes[9] == "Ankle boot"
    assert all(isinstance(c, str) for c in model.classes)
    assert model.image_shape == (28, 28)


def test_light_noisy_background_is_inverted_automatically(trained, tmp_path, monkeypatch, capsys):
    from hpsearch.export import has_light_background, predict_images

    idx = _right(trained, 10)
    rng = np.random.default_rng(0)
    photos = []
    for i in idx:
        path = tmp_path / f"photo{i}.jpg"
        _photo(trained["images"][i], rng).save(path, quality=90)
        photos.append(str(path))
    expected = [trained["data"].classes[int(trained["pred"][i])] for i in idx]
    results = predict_images(photos, trained["path"])
    assert all(r.inverted for r in results)
    agree = sum(r.label == e for r, e in zip(results, expected))
    assert agree >= 7, ([r.label for r in results], expected)
    assert len({r.label for r in results}) >= 6  # not one class for everything (the bug: all "Sandal")

    # the dataset's own images (light on dark) are never inverted
    assert not any(has_light_background(img / 255.0) for img in trained["images"][:2000])
    dark = [_png(trained["images"][i], tmp_path / f"dark{i}.png") for i in idx[:2]]
    assert [r.inverted for r in predict_images(dark, trained["path"])] == [False, False]

    # the command line: JSON says so, text marks it, --no-invert and --invert force it
    code, out, err = cli(["predict", *photos[:2], dark[0], "--checkpoint", trained["path"], "--json"], monkeypatch, capsys)
    assert code == 0 and err == "", err
    assert [r["inverted"] for r in json.loads(out)] == [True, True, False]
    code, out, _ = cli(["predict", photos[0], dark[0], "--checkpoint", trained["path"]], monkeypatch, capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].endswith("\t(auto-inverted)") and "inverted" not in lines[1]
    code, out, _ = cli(["predict", photos[0], "--checkpoint", trained["path"], "--no-invert", "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)[0]["inverted"] is False
    code, out, _ = cli(["predict", dark[0], "--checkpoint", trained["path"], "--invert"], monkeypatch, capsys)
    assert code == 0 and "(auto-inverted)" not in out  # forced, not decided: no mark


def test_transparent_images_are_composited_and_blank_ones_warned(trained, tmp_path, monkeypatch, capsys):
    from hpsearch.export import prepare_image

    empty = tmp_path / "empty.png"
    Image.new("RGBA", (28, 28), (0, 0, 0, 0)).save(empty)
    dark_ink, light_ink = np.zeros((28, 28, 4), np.uint8), np.zeros((28, 28, 4), np.uint8)
    dark_ink[6:22, 9:19] = (10, 10, 10, 255)  # a dark shape on transparency
    light_ink[6:22, 9:19] = (240, 240, 240, 255)
    dark = _png(dark_ink, tmp_path / "dark_ink.png", "RGBA")
    light = _png(light_ink, tmp_path / "light_ink.png", "RGBA")
    for path in (dark, light):  # either way: a light shape on black, as the dataset has it
        x, _ = prepare_image(path, (28, 28))
        assert x[0, 10, 12] > 0.9 and x[0, 0, 0] < 0.1, path

    good = _png(trained["images"][_right(trained, 1)[0]], tmp_path / "good.png")
    code, out, err = cli(["predict", good, str(empty), "--checkpoint", trained["path"]], monkeypatch, capsys)
    assert code == 0, err
    assert [line.split("\t")[0] for line in out.splitlines()] == [good, str(empty)]  # still reported
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and str(empty) in lines[0] and "blank" in lines[0]
    code, out, err = cli(["predict", good, str(empty), "--checkpoint", trained["path"], "--json"], monkeypatch, capsys)
    rows = json.loads(out)
    assert code == 0 and "warning" not in rows[0] and "blank" in rows[1]["warning"] and rows[1]["label"]
    code, _, err = cli(["predict", str(empty), "--checkpoint", trained["path"], "--no-invert"], monkeypatch, capsys)
    assert code == 0 and "blank" in err  # all white is just as blank


def test_unreadable_files_are_reported_and_the_rest_classified(trained, tmp_path, monkeypatch, capsys):
    from hpsearch.export import predict_images

    idx = _right(trained, 2)
    good = [_png(trained["images"][i], tmp_path / f"good{i}.png") for i in idx]
    labels = [trained["data"].classes[int(trained["pred"][i])] for i in idx]
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    cut = tmp_path / "cut.png"
    Image.fromarray(trained["images"][0]).save(cut)
    cut.write_bytes(cut.read_bytes()[:60])
    missing = tmp_path / "missing.png"
    paths = [good[0], str(fake), str(missing), str(cut), good[1]]

    code, out, err = cli(["predict", *paths, "--checkpoint", trained["path"]], monkeypatch, capsys)
    assert code == 1
    assert [line.split("\t")[:2] for line in out.splitlines()] == [[good[0], labels[0]], [good[1], labels[1]]]
    errors = err.splitlines()
    assert len(errors) == 3 and all(e.startswith("error:") for e in errors) and "Traceback" not in err
    for line, path, why in zip(errors, (fake, missing, cut), ("not an image", "does not exist", "image")):
        assert str(path) in line and why in line, line

    code, out, _ = cli(["predict", *paths, "--checkpoint", trained["path"], "--json"], monkeypatch, capsys)
    rows = json.loads(out)
    assert code == 1 and [r["image"] for r in rows] == paths
    assert [("error" in r) for r in rows] == [False, True, True, True, False]
    assert rows[0]["label"] == labels[0] and rows[4]["label"] == labels[1] and set(rows[1]) == {"image", "error"}

    # the library: errors="report" does the same; by default the first bad file raises, as before
    results = predict_images(paths, trained["path"], errors="report")
    assert [r.label for r in results if r.error is None] == labels

    # a bad checkpoint is still exit 2, whatever the images
    code, _, err = cli(["predict", *paths, "--checkpoint", str(fake)], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(code, err, "not an hpsearch checkpoint")


def test_top_in_text_output(trained, tmp_path, monkeypatch, capsys):
    paths = [_png(trained["images"][i], tmp_path / f"{i}.png") for i in _right(trained, 3)]
    code, out, _ = cli(["predict", *paths, "--checkpoint", trained["path"]], monkeypatch, capsys)
    default = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and [len(f) for f in default] == [3, 3, 3]  # one class per image, as always

    code, out, _ = cli(["predict", *paths, "--checkpoint", trained["path"], "--top", "3"], monkeypatch, capsys)
    rows = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and [len(f) for f in rows] == [7, 7, 7]
    for row, short in zip(rows, default):
        assert row[:3] == short
        probs = [float(p) for p in row[2::2]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert len(set(row[1::2])) == 3

    code, out, _ = cli(["predict", paths[0], "--checkpoint", trained["path"], "--json"], monkeypatch, capsys)
    assert code == 0 and len(json.loads(out)[0]["top"]) == 3  # --json keeps its default of 3
    code, out, _ = cli(["predict", paths[0], "--checkpoint", trained["path"], "--json", "--top", "5"], monkeypatch, capsys)
    assert len(json.loads(out)[0]["top"]) == 5


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.* deprecation notices (torch 2.14)
def test_exports_work_as_the_model(trained, tmp_path, monkeypatch, capsys):
    from hpsearch.export import export_model

    paths = [_png(trained["images"][i], tmp_path / f"{i}.png") for i in _right(trained, 4)]
    code, want, _ = cli(["predict", *paths, "--checkpoint", trained["path"]], monkeypatch, capsys)
    assert code == 0
    ts = export_model(trained["path"], "torchscript", tmp_path / "model.ts")
    ts_as_pt = tmp_path / "scripted.pt"  # told apart by content, not by name
    ts_as_pt.write_bytes(ts.read_bytes())
    models = [ts, ts_as_pt]
    if _has("onnxruntime") and _has("onnx"):
        models.append(export_model(trained["path"], "onnx", tmp_path / "model.onnx"))
    for model in models:
        code, out, err = cli(["predict", *paths, "--checkpoint", str(model)], monkeypatch, capsys)
        assert code == 0 and err == "", err
        assert [line.split("\t")[:2] for line in out.splitlines()] == [line.split("\t")[:2] for line in want.splitlines()]

    # an export without hpsearch's metadata, and ONNX without onnxruntime: one line each, exit 2
    bare = tmp_path / "bare.ts"
    torch.jit.save(torch.jit.script(torch.nn.Flatten()), str(bare))
    code, _, err = cli(["predict", paths[0], "--checkpoint", str(bare)], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(code, err, "metadata")
    onnx_file = tmp_path / "any.onnx"
    onnx_file.write_bytes(b"\x08\x07")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    code, _, err = cli(["predict", paths[0], "--checkpoint", str(onnx_file)], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(code, err, "onnxruntime", ".pt checkpoint")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None

"""Checkpoints, TorchScript/ONNX exports and `hpsearch predict` with an accurate Fashion-MNIST model."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hpsearch.errors import HPSearchError

from conftest import assert_one_line_error, cli


# One small model of each family: every test below runs against an MLP, an MLP with batch norm
# (running statistics and an integer batch count in its state) and a CNN checkpoint.
FAMILY_CONFIGS = {
    "mlp": dict(num_layers=2, layer_size=128, lr=2e-3, batch_size=128, epochs=3, seed=0),
    "mlp-bn": dict(num_layers=3, layer_size=96, lr=2e-3, batch_size=128, epochs=3, seed=0, batch_norm=True),
    "cnn": dict(family="cnn", conv_blocks=2, channels=8, num_layers=2, layer_size=64, conv_dropout=0.1,
                lr=3e-3, batch_size=128, epochs=2, seed=0, init="normal"),
}


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def trained(request, tmp_path_factory, fashion_dir):
    """A model that is right on ~85% of the test split, saved as a checkpoint."""
    from hpsearch import TrainConfig, load_dataset, train_one
    from hpsearch.checkpoint import save_checkpoint

    data = load_dataset("fashion-mnist", fashion_dir, "cpu", subset=10000, seed=0)
    result = train_one(TrainConfig(**FAMILY_CONFIGS[request.param]), data)
    config = FAMILY_CONFIGS[request.param]
    assert result.model.spec.family == config.get("family", "mlp")
    assert len(getattr(result.model, "batch_norms", list)()) == (2 if config.get("batch_norm") else 0)
    tmp = tmp_path_factory.mktemp(f"export-{request.param}")
    path = save_checkpoint(tmp / "model.pt", result.model, classes=data.classes, image_shape=data.image_shape,
                           meta={"dataset": data.name, "note": "test"})
    with torch.no_grad():
        logits = result.model(data.test_x.view(-1, 1, 28, 28))
    return {"tmp": tmp, "path": path, "model": result.model, "data": data, "logits": logits,
            "pred": logits.argmax(-1)}


def test_model_is_accurate(trained):
    assert (trained["pred"] == trained["data"].test_y).float().mean() > 0.8


def test_checkpoint_round_trip(trained):
    from hpsearch import load_model
    from hpsearch.checkpoint import load_checkpoint

    ckpt = torch.load(trained["path"], weights_only=True)
    assert ckpt["format"] == "hpsearch-checkpoint" and ckpt["image_shape"] == [28, 28]
    assert ckpt["meta"] == {"dataset": "fashion-mnist", "note": "test"}
    model = load_model(trained["path"])
    assert isinstance(model, torch.nn.Module) and not model.training
    x = trained["data"].test_x[:64]
    with torch.no_grad():
        assert torch.equal(model(x.view(-1, 1, 28, 28)), trained["logits"][:64])
        assert torch.equal(model(x), trained["logits"][:64])  # flat [N, 784] works too
    _, ckpt2 = load_checkpoint(trained["path"])
    assert ckpt2["classes"][9] == "Ankle boot"
    assert not [p for p in trained["tmp"].iterdir() if p.name.endswith(".tmp")]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated in torch 2.14
def test_torchscript_and_onnx_agree_with_checkpoint(trained):
    from hpsearch.export import export_model

    x = trained["data"].test_x.view(-1, 1, 28, 28)
    ts_path = export_model(trained["path"], "torchscript", trained["tmp"] / "model.ts")
    extra = {"hpsearch.json": ""}
    scripted = torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["hpsearch.json"])["classes"][0] == "T-shirt/top"
    with torch.no_grad():
        ts_logits = scripted(x)
    assert (ts_logits.argmax(-1) == trained["pred"]).float().mean() >= 0.999
    torch.testing.assert_close(ts_logits, trained["logits"], atol=1e-4, rtol=1e-4)

    ort = pytest.importorskip("onnxruntime")
    onnx_path = export_model(trained["path"], "onnx", trained["tmp"] / "model.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    (onnx_logits,) = session.run(["logits"], {"images": x.numpy()})  # the whole test split: batch is dynamic
    onnx_pred = torch.from_numpy(onnx_logits).argmax(-1)
    assert (onnx_pred == trained["pred"]).float().mean() >= 0.999
    np.testing.assert_allclose(onnx_logits, trained["logits"].numpy(), atol=1e-4, rtol=1e-4)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["hpsearch"])["classes"][1] == "Trouser"

    # `predict` takes both exports as its model, with their embedded class names
    from hpsearch.export import load_classifier

    for path in (ts_path, onnx_path):
        clf = load_classifier(path)
        assert clf.classes == tuple(trained["data"].classes) and clf.image_shape == (28, 28)
        assert clf.dataset == "fashion-mnist"
        with torch.no_grad():
            assert (clf(x[:500]).argmax(-1) == trained["pred"][:500]).float().mean() >= 0.998

    copy = export_model(trained["path"], "pt", trained["tmp"] / "copy.pt")
    assert torch.load(copy, weights_only=True)["meta"]["note"] == "test"


def _chosen(trained, per_class=2):
    """Test images the model gets right (from tensors), `per_class` of each class."""
    data, pred = trained["data"], trained["pred"]
    chosen = []
    for c in range(10):
        ok = torch.nonzero((data.test_y == c) & (pred == c)).flatten()[:per_class]
        chosen += ok.tolist()
    return chosen


def _save(img: np.ndarray, path, mode=None):
    Image.fromarray(img, mode=mode).save(path)
    return str(path)


def test_predict_png_returns_labels(trained, tmp_path):
    from hpsearch.export import predict_images

    data = trained["data"]
    idx = _chosen(trained)
    images = (data.test_x[idx].view(-1, 28, 28).numpy() * 255).round().astype(np.uint8)
    paths = [_save(img, tmp_path / f"{i}.png") for i, img in zip(idx, images)]
    results = predict_images(paths, trained["path"])
    labels = [data.classes[int(data.test_y[i])] for i in idx]
    assert [r.label for r in results] == labels  # PNG is lossless: exactly the tensor predictions
    assert all(0.1 < r.probability <= 1 for r in results)
    assert [r.index for r in results] == [int(data.test_y[i]) for i in idx]

    assert not any(r.inverted for r in results)

    # dark-on-light scans: inverted automatically (their border is light), or by --invert
    inv_paths = [_save(255 - img, tmp_path / f"inv{i}.png") for i, img in zip(idx, images)]
    assert [r.label for r in predict_images(inv_paths, trained["path"], invert=True)] == labels
    auto = predict_images(inv_paths, trained["path"])
    assert [r.label for r in auto] == labels and all(r.inverted for r in auto)

    # the command line, with --json
    proc = subprocess.run([sys.executable, "-m", "hpsearch", "predict", *paths[:6], *inv_paths[:2],
                           "--checkpoint", str(trained["path"]), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["label"] for r in out[:6]] == labels[:6]
    assert {"image", "index", "label", "probability", "top", "inverted"} <= set(out[0]) and len(out[0]["top"]) == 3
    assert [r["inverted"] for r in out] == [False] * 6 + [True] * 2


def test_predict_other_sizes_and_modes(trained, tmp_path):
    """Larger images, RGB JPEG, 16-bit and palette PNGs are brought to the dataset's 28x28 format."""
    from hpsearch.export import predict_images

    data, pred = trained["data"], trained["pred"]
    idx = list(range(200))
    images = (data.test_x[idx].view(-1, 28, 28).numpy() * 255).round().astype(np.uint8)
    paths = []
    for i, img in zip(idx, images):
        big = Image.fromarray(img).resize((84, 84), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (120, 100), 0)
        canvas.paste(big, (7, 11))  # off-centre, on a larger background
        kind = i % 4
        if kind == 0:
            path = tmp_path / f"{i}.jpg"
            canvas.convert("RGB").save(path, quality=95)
        elif kind == 1:
            path = tmp_path / f"{i}.png"
            Image.fromarray((np.asarray(canvas).astype(np.uint16) * 257)).save(path)  # 16-bit
        elif kind == 2:
            path = tmp_path / f"{i}.png"
            canvas.convert("P").save(path)
        else:
            path = tmp_path / f"{i}.png"
            canvas.convert("RGBA").save(path)
        paths.append(str(path))
    results = predict_images(paths, trained["path"])
    agree = np.mean([r.index == int(pred[i]) for r, i in zip(results, idx)])
    assert agree >= 0.85, agree


def test_mnist_way_resize():
    """Not 28x28: ink fitted into 20x20 (aspect kept), centre of mass in the middle of 28x28."""
    from hpsearch.export import to_dataset_format

    img = np.zeros((300, 200))
    img[40:140, 120:170] = 1.0  # a 100x50 bar, far off-centre
    out = to_dataset_format(img, (28, 28), "mnist")
    rows, cols = np.nonzero(out > 0.5)
    assert out.shape == (28, 28)
    assert rows.max() - rows.min() + 1 <= 20 and cols.max() - cols.min() + 1 <= 11
    r, c = np.indices(out.shape)
    assert abs((r * out).sum() / out.sum() - 13.5) <= 1 and abs((c * out).sum() / out.sum() - 13.5) <= 1
    # the dataset's own size is taken as it is
    same = np.random.default_rng(0).random((28, 28))
    assert np.array_equal(to_dataset_format(same, (28, 28), "mnist"), same)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bad_checkpoints_and_images(trained, tmp_path, monkeypatch, capsys):
    from hpsearch import load_model
    from hpsearch.export import export_model, predict_images

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    pickled = tmp_path / "evil.pt"
    torch.save({"format": "hpsearch-checkpoint", "x": _Evil()}, pickled)
    raw_pickle = tmp_path / "raw.pkl"
    raw_pickle.write_bytes(pickle.dumps({"a": 1}))
    plain = tmp_path / "plain.pt"
    torch.save(trained["model"].state_dict(), plain)  # a bare state_dict is not a checkpoint
    for path, words in ((text, "not a PyTorch file"), (pickled, "would run code"), (plain, "not an hpsearch checkpoint"),
                        (tmp_path / "missing.pt", "does not exist"), (tmp_path, "not a file")):
        with pytest.raises(HPSearchError, match=words) as exc:
            load_model(path)
        assert "\n" not in str(exc.value)
    with pytest.raises(HPSearchError, match="not an hpsearch checkpoint"):
        load_model(raw_pickle)
    assert "this must never run" not in capsys.readouterr().out

    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    truncated = tmp_path / "cut.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    for path, words in ((fake, "not an image"), (truncated, "not (an|a readable) image"),
                        (tmp_path / "none.png", "does not exist")):
        with pytest.raises(HPSearchError, match=words):
            predict_images([path], trained["path"])
    with pytest.raises(HPSearchError, match="unknown export format"):
        export_model(trained["path"], "tflite", tmp_path / "m")

    # the command line: one line on stderr, non-zero exit (1: an image, 2: the checkpoint), no traceback
    code, _, err = cli(["predict", str(fake), "--checkpoint", str(trained["path"])], monkeypatch, capsys)
    assert_one_line_error(code, err, "not an image")
    assert code == 1
    code, _, err = cli(["predict", str(fake), "--checkpoint", str(text)], monkeypatch, capsys)
    assert_one_line_error(code, err, "not an hpsearch checkpoint")
    assert code == 2
    code, _, err = cli(["export", "--checkpoint", str(pickled), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
                       monkeypatch, capsys)
    assert_one_line_error(code, err, "would run code")
    monkeypatch.chdir(tmp_path)  # no studies/ here: export has nothing to default to
    code, _, err = cli(["export", "--format", "onnx", "--out", str(tmp_path / "m.onnx")], monkeypatch, capsys)
    assert_one_line_error(code, err, "--checkpoint")
    code, out, err = cli(["export", "--checkpoint", str(trained["path"]), "--format", "torchscript",
                          "--out", str(tmp_path / "m.ts")], monkeypatch, capsys)
    assert code == 0 and (tmp_path / "m.ts").is_file(), err


def test_onnx_missing_is_one_line(trained, tmp_path, monkeypatch):
    from hpsearch.export import export_model

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(HPSearchError, match="needs the onnx package"):
        export_model(trained["path"], "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()

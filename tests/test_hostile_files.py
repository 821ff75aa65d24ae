"""Hostile files: memory bounded by the input, not by what its header claims; user errors in one line.

A checkpoint's spec and image_shape, a tensor's shape, an export's metadata and an image's size are
all claims a file makes about itself. `predict` must check them before it allocates anything, and
refuse the file in one line: exit 2 for the model, exit 1 (and the other images classified) for an
image. Whatever could allocate gigabytes on today's code runs in a child process under a memory cap,
and its peak RSS is compared with predicting on a good checkpoint.
"""

import copy
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, cli

# Importing torch alone maps ~3.2 GB of address space (so a 2 GiB RLIMIT_AS cannot even start
# the CLI); 8 GiB still stops a runaway far below this machine's memory. The check itself is
# the child's peak RSS against a good run's.
ADDRESS_SPACE_CAP = 8 << 30
RSS_SLACK = 200 << 20  # a refusal may cost this much over predicting with a good checkpoint
CHILD_TIMEOUT_S = 120
QUICK_S = 60  # a refusal is a few seconds of imports; generous for a busy 2-core machine


# The child caps itself before importing anything (a preexec_fn is unsafe in a threaded parent).
CAPPED_MAIN = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE_CAP}, "
               f"{ADDRESS_SPACE_CAP})); sys.argv[0] = 'hpsearch'; runpy.run_module('hpsearch', run_name='__main__')")


def run_capped(args, cwd):
    """`hpsearch ARGS` in a child under the cap: (exit code, stdout, stderr, peak RSS bytes, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out_path, err_path = cwd / "child.out", cwd / "child.err"
    start = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        child = subprocess.Popen([sys.executable, "-c", CAPPED_MAIN, *map(str, args)], cwd=cwd, env=env,
                                 stdout=out, stderr=err)
    while True:  # os.wait4, not Popen.wait: it gives this child's own peak RSS
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - start > CHILD_TIMEOUT_S:
            os.kill(child.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(child.pid, 0)
            break
        time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return (child.returncode, out_path.read_text(), err_path.read_text(), usage.ru_maxrss * 1024,
            time.monotonic() - start)


def _fashion_pngs(fashion_dir, directory, n=2):
    """The first n Fashion-MNIST test images as PNG files."""
    raw = gzip.decompress((fashion_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    paths = []
    for i in range(n):
        paths.append(directory / f"fashion{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def world(tmp_path_factory, fashion_dir):
    """A small (untrained) MLP checkpoint as a dict to corrupt, real images, and the peak RSS of
    predicting with the intact checkpoint in a capped child."""
    from hpsearch.checkpoint import checkpoint_dict, write_checkpoint_dict
    from hpsearch.models import build_model

    tmp = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    model = build_model({"num_layers": 2, "layer_size": 64}, mean=0.286, std=0.353, image_shape=(28, 28))
    ckpt = checkpoint_dict(model, image_shape=(28, 28), meta={"dataset": "fashion-mnist"})
    good = tmp / "good.pt"
    write_checkpoint_dict(ckpt, good)
    images = _fashion_pngs(fashion_dir, tmp)
    code, out, err, rss, _ = run_capped(["predict", *images, "--checkpoint", good], tmp)
    assert code == 0 and len(out.splitlines()) == len(images) and not err.strip(), err
    return {"tmp": tmp, "ckpt": ckpt, "good": good, "images": images, "rss": rss}


def hostile(world, tmp_path, name, spec=None, **entries):
    """A copy of the good checkpoint with some spec fields and top-level entries replaced."""
    from hpsearch.checkpoint import write_checkpoint_dict

    ckpt = copy.deepcopy(world["ckpt"])
    ckpt["spec"].update(spec or {})
    ckpt.update(entries)
    path = tmp_path / name
    write_checkpoint_dict(ckpt, path)
    return path


def assert_refused_cheaply(world, result, code, *fragments):
    got, out, err, rss, seconds = result
    assert got == code and "Traceback" not in err, err
    assert_one_line_error(got, err, *fragments)
    assert rss < world["rss"] + RSS_SLACK, f"peak RSS {rss >> 20} MB vs {world['rss'] >> 20} MB for a good run"
    assert seconds < QUICK_S
    return out


def test_huge_image_shape_is_refused_before_allocating(world, tmp_path):
    # The file: ~200 KB of weights whose image_shape asked `predict` for 23.7 GB.
    path = hostile(world, tmp_path, "huge.pt", image_shape=[100000, 100000])
    assert path.stat().st_size < 300_000
    result = run_capped(["predict", world["images"][0], "--checkpoint", path], tmp_path)
    assert_refused_cheaply(world, result, 2, str(path), "image_shape", "[100000, 100000]")


def test_huge_spec_is_refused_before_building(world, tmp_path):
    # The spec itself claims 5000x5000 images: an MLP with a 25M-wide input layer (6.4 GB).
    path = hostile(world, tmp_path, "wide.pt", spec={"height": 5000, "width": 5000, "in_features": 25_000_000},
                   image_shape=[5000, 5000])
    result = run_capped(["predict", world["images"][0], "--checkpoint", path], tmp_path)
    assert_refused_cheaply(world, result, 2, str(path), "damaged", "in_features")


def test_spec_bigger_than_its_tensors_is_refused_before_building(world, tmp_path):
    # Every size within the search space's bounds, but 550M parameters (2.2 GB) for 51K stored.
    path = hostile(world, tmp_path, "deep.pt", spec={"num_layers": 4, "layer_size": 16384})
    result = run_capped(["predict", world["images"][0], "--checkpoint", path], tmp_path)
    assert_refused_cheaply(world, result, 2, str(path), "parameters", "50,890")


def test_huge_png_among_good_images(world, tmp_path):
    # 13000x13000: a ~165 KB PNG that took 4.4 GB and printed Pillow's DecompressionBombWarning.
    bomb = tmp_path / "bomb.png"
    Image.new("L", (13000, 13000)).save(bomb)
    assert bomb.stat().st_size < 1_000_000
    first, second = world["images"]
    result = run_capped(["predict", first, bomb, second, "--checkpoint", world["good"]], tmp_path)
    out = assert_refused_cheaply(world, result, 1, str(bomb), "too large", "13000x13000")
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(first), str(second)]


def test_huge_image_shape_in_an_export(world, tmp_path):
    # An export's metadata sizes every image too: a TorchScript file claiming 100000x100000.
    from hpsearch.checkpoint import model_from_checkpoint

    meta = {"format": "hpsearch-export", "classes": world["ckpt"]["classes"], "image_shape": [100000, 100000]}
    path = tmp_path / "huge.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        scripted = torch.jit.script(model_from_checkpoint(world["ckpt"]))
        torch.jit.save(scripted, str(path), _extra_files={"hpsearch.json": json.dumps(meta)})
    result = run_capped(["predict", world["images"][0], "--checkpoint", path], tmp_path)
    assert_refused_cheaply(world, result, 2, str(path), "image_shape", "[100000, 100000]")


@pytest.mark.parametrize("shape", [[0, 0], [-3, 28], [28.5, 28], ["28", "28"], [28], [28, 28, 1], [True, 28],
                                   [14, 56], "28x28"])
def test_bad_image_shape_is_one_line(world, tmp_path, monkeypatch, capsys, shape):
    path = hostile(world, tmp_path, "bad.pt", image_shape=shape)
    code, out, err = cli(["predict", str(world["images"][0]), "--checkpoint", str(path)], monkeypatch, capsys)
    assert_one_line_error(code, err, str(path), "damaged", "image_shape")
    assert code == 2 and not out


@pytest.mark.parametrize("spec, words", [
    ({"layer_size": 512}, ("mlp 2x512", "407,050 parameters", "stores 50,890")),
    ({"height": -3, "width": 28}, ("height -3",)),
    ({"layer_size": 64.0}, ("layer_size 64.0",)),
    ({"num_layers": True}, ("num_layers True",)),
    ({"std": float("nan")}, ("std nan",)),
    ({"num_classes": 11}, ("10 class names for 11 outputs",)),
    ({"batch_norm": "yes"}, ("batch_norm 'yes'",)),
    ({"batch_norm": True}, ("51,018 parameters", "stores 50,890")),  # a scale and a shift per hidden unit more
    ({"batch_norm": 1}, ("batch_norm 1",)),
    ({"family": "cnn", "batch_norm": True}, ("batch_norm is for the mlp family",)),
])
def test_spec_that_does_not_fit_the_file_is_one_line(world, tmp_path, monkeypatch, capsys, spec, words):
    path = hostile(world, tmp_path, "bad.pt", spec=spec)
    code, out, err = cli(["predict", str(world["images"][0]), "--checkpoint", str(path)], monkeypatch, capsys)
    assert_one_line_error(code, err, str(path), "damaged", *words)
    assert code == 2 and not out


def _state_dict_variants(state):
    """Stored tensors that do not fit the spec although the spec itself is fine."""
    transposed = {**state, "layers.0.weight": state["layers.0.weight"].t().contiguous()}  # same count
    renamed = {("layers.9.weight" if k == "layers.2.weight" else k): v for k, v in state.items()}
    zero_std = {**state, "normalize.std": torch.tensor(0.0)}  # would give NaN probabilities
    integers = {**state, "layers.2.bias": state["layers.2.bias"].long()}
    # zero-stride views: 51K "stored" parameters in a few bytes, copied out to their full size on load
    views = {k: (torch.zeros(1).expand(v.shape) if v.dim() else v) for k, v in state.items()}
    return [(transposed, ("'layers.0.weight'", "[784, 64]", "[64, 784]")),
            (renamed, ("'layers.2.weight'", "missing")), (zero_std, ("std 0.0",)),
            (integers, ("float tensors",)), (views, ("more bytes than the file stores",))]


@pytest.mark.parametrize("variant", range(5))
def test_tensors_that_do_not_fit_the_spec_are_one_line(world, tmp_path, monkeypatch, capsys, variant):
    state, words = _state_dict_variants(world["ckpt"]["state_dict"])[variant]
    path = hostile(world, tmp_path, "bad.pt", state_dict=state)
    code, out, err = cli(["predict", str(world["images"][0]), "--checkpoint", str(path)], monkeypatch, capsys)
    assert_one_line_error(code, err, str(path), "damaged", *words)
    assert code == 2 and not out


def test_zip_bomb_checkpoint_is_refused_before_unpacking(world, tmp_path, monkeypatch, capsys):
    # A valid checkpoint of 23 MB of zero weights, re-zipped with deflate: ~25 KB that torch.load
    # would unpack in full. torch.save never compresses, so the archive's own sizes say enough.
    from hpsearch.checkpoint import checkpoint_dict, write_checkpoint_dict
    from hpsearch.models import build_model

    ckpt = checkpoint_dict(build_model({"num_layers": 3, "layer_size": 2048}), image_shape=(28, 28))
    for name, tensor in ckpt["state_dict"].items():
        if name.startswith("layers."):
            tensor.zero_()
    plain, bomb = tmp_path / "plain.pt", tmp_path / "bomb.pt"
    write_checkpoint_dict(ckpt, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    plain.unlink()
    assert bomb.stat().st_size < 1_000_000
    code, out, err = cli(["predict", str(world["images"][0]), "--checkpoint", str(bomb)], monkeypatch, capsys)
    assert_one_line_error(code, err, str(bomb), "unpacks to", "decompression bomb")
    assert code == 2 and not out


def test_image_pixel_limit_is_checked_before_decoding(world, tmp_path, monkeypatch):
    """The limit applies to the header's size: at the limit an image is read, one pixel over it is
    refused as that file's error (the others still classified), with no Pillow warning."""
    from hpsearch import export

    monkeypatch.setattr(export, "MAX_IMAGE_PIXELS", 28 * 28)
    at_limit, over = tmp_path / "at.png", tmp_path / "over.png"
    Image.new("L", (28, 28), 30).save(at_limit)
    Image.new("L", (29, 28), 30).save(over)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = export.predict_images([at_limit, over], world["good"], errors="report")
    assert results[0].error is None and results[0].label is not None
    assert results[1].error is not None and str(over) in results[1].error and "29x28" in results[1].error
    assert "\n" not in results[1].error

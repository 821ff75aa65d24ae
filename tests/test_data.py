import gzip
import struct

import numpy as np
import pytest
import torch

from hpsearch import data as data_mod
from hpsearch.data import load_dataset, locate, read_idx, stratified_split
from hpsearch.errors import DataError

from conftest import make_idx_dir, write_idx


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_loads_raw_and_gz(tmp_path, gz):
    make_idx_dir(tmp_path, n_train=200, n_test=50, gz=gz)
    ds = load_dataset("idx", tmp_path, "cpu", val_fraction=0.1, seed=0)
    assert ds.train_x.shape == (180, 784) and ds.val_x.shape == (20, 784) and ds.test_x.shape == (50, 784)
    assert ds.train_x.dtype == torch.float32
    assert 0.0 <= float(ds.train_x.min()) and float(ds.train_x.max()) == 1.0
    assert ds.num_classes == 10 and ds.image_shape == (28, 28)
    # stratified: 10% of each class held out
    assert torch.bincount(ds.val_y, minlength=10).tolist() == [2] * 10
    # pixels survive the round trip: class-0 square is at rows 4..11, cols 2..5
    img = ds.test_x[0].view(28, 28)
    assert float(img[4:12, 2:6].min()) == 1.0


def test_split_is_seeded_and_disjoint():
    labels = np.repeat(np.arange(10), 100)
    a_keep, a_held = stratified_split(labels, 0.1, seed=3)
    b_keep, b_held = stratified_split(labels, 0.1, seed=3)
    c_keep, c_held = stratified_split(labels, 0.1, seed=4)
    assert np.array_equal(a_held, b_held) and not np.array_equal(a_held, c_held)
    assert len(np.intersect1d(a_keep, a_held)) == 0 and len(a_keep) + len(a_held) == 1000


def test_real_fashion_mnist(fashion_dir):
    ds = load_dataset("fashion-mnist", None, "cpu", seed=0)  # found without flags
    assert ds.source == str(fashion_dir)
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (54000, 6000, 10000)
    assert torch.bincount(ds.val_y).tolist() == [600] * 10
    assert ds.classes[9] == "Ankle boot"
    assert 0.28 < ds.mean < 0.29 and 0.35 < ds.std < 0.36  # Fashion-MNIST's known statistics


def test_subset_is_stratified(fashion_dir):
    ds = load_dataset("fashion-mnist", fashion_dir, "cpu", subset=1000, seed=0)
    assert len(ds.train_y) + len(ds.val_y) == 1000
    assert torch.bincount(ds.val_y).tolist() == [10] * 10
    assert len(ds.test_y) == 10000  # the test file is never subset


def test_corrupt_and_truncated_files(tmp_path):
    make_idx_dir(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    raw = labels.read_bytes()
    labels.write_bytes(raw[:-7])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("idx", tmp_path)
    labels.write_bytes(b"\x12\x34\x56\x78" + raw[4:])
    with pytest.raises(DataError, match="magic"):
        load_dataset("idx", tmp_path)
    labels.write_bytes(raw[:5])
    with pytest.raises(DataError, match="header"):
        load_dataset("idx", tmp_path)
    gz = tmp_path / "x-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(raw)[:30])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(gz)


def test_label_count_mismatch(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(49, dtype=np.uint8))
    with pytest.raises(DataError, match="50 test images but 49 labels"):
        load_dataset("idx", tmp_path)


def test_missing_file_is_named(tmp_path):
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("idx", tmp_path)


def test_offline_without_local_copy_names_the_fixes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_mod, "SYSTEM_DATA_ROOT", tmp_path / "nowhere")
    with pytest.raises(DataError) as err:
        locate("fashion-mnist", None)  # torchvision's download fails offline (or is blocked here)
    msg = str(err.value)
    assert "--data-dir" in msg and "dataset-fashion-mnist" in msg and "\n" not in msg


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        locate("cifar", None)


def test_idx_dataset_names_the_missing_file(tmp_path):
    make_idx_dir(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="lacks train-images-idx3-ubyte"):
        locate("idx", tmp_path)


def test_failed_download_leaves_no_empty_directories(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, root, train, download):
            (tmp_path / "data" / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd, "MNIST", Offline)
    with pytest.raises(DataError, match="could not be downloaded"):
        data_mod._download("mnist", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_a_gz_that_expands_past_its_header_is_refused_without_decompressing_the_rest(tmp_path):
    """A few MB of .gz whose body expands to 512 MiB, under a header that says 60000x28x28: refused
    after reading what the header says (measured in a fresh process: peak memory, not time)."""
    import subprocess
    import sys
    import zlib

    path = tmp_path / "bomb-idx3-ubyte.gz"
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    with open(path, "wb") as f:
        f.write(packer.compress(struct.pack(">HBB3I", 0, 8, 3, 60000, 28, 28)))
        zeros = bytes(16 << 20)
        for _ in range(32):
            f.write(packer.compress(zeros))
        f.write(packer.flush())
    assert path.stat().st_size < 8 << 20
    probe = (
        "import resource, sys; from pathlib import Path; from hpsearch.data import read_idx; from hpsearch.errors import DataError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    read_idx(Path(sys.argv[1]))\nexcept DataError as e:\n    print(e)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120,
                         check=True).stdout.splitlines()
    assert "longer than its header says" in out[0]
    assert int(out[1]) < 200, f"peak memory grew by {out[1]} MiB"  # the header's 47 MB, not 512 MiB

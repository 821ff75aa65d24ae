import gzip
import os
import subprocess
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write an unsigned-byte IDX file the way the MNIST files are made."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_idx_dir(directory: Path, n_train: int = 200, n_test: int = 50, classes: int = 10,
                 gz: bool = False, seed: int = 0) -> Path:
    """A small synthetic MNIST-format dataset: each class is a bright square at its own place."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % classes
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 5)
            images[i, 4 + 10 * r: 12 + 10 * r, 2 + 5 * col: 6 + 5 * col] = 255
        write_idx(directory / f"{split}-images-idx3-ubyte", images.astype(np.uint8), gz)
        write_idx(directory / f"{split}-labels-idx1-ubyte", labels.astype(np.uint8), gz)
    return directory


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("real Fashion-MNIST missing: apt-get install dataset-fashion-mnist (.ci/run does)")
    return FASHION_DIR


@pytest.fixture(scope="session")
def fashion_small(fashion_dir):
    from hpsearch.data import load_dataset

    return load_dataset("fashion-mnist", fashion_dir, "cpu", subset=4000, seed=0)


def cli(args, monkeypatch, capsys):
    """Run `hpsearch ARGS` in-process through the real entry point; (exit code, stdout, stderr)."""
    from hpsearch import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["hpsearch", *args])
    with pytest.raises(SystemExit) as exc:
        cli_module.main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_one_line_error(code, err, *fragments):
    assert code not in (0, None), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test PostgreSQL server's URL (HPSEARCH_TEST_POSTGRES, which .ci/run sets), checked reachable.

    Without the variable the tests skip, saying how to get a server; with it, or with CI=true,
    they fail instead, so a CI run proves they ran.
    """
    import os

    url = os.environ.get("HPSEARCH_TEST_POSTGRES", "").strip()
    if not url:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but HPSEARCH_TEST_POSTGRES is not set: .ci/run starts a PostgreSQL server "
                        "for these tests")
        pytest.skip("no PostgreSQL server: eval \"$(bash scripts/postgres.sh start /tmp/hps-pg)\" starts one "
                    "and sets HPSEARCH_TEST_POSTGRES (root or any user with Debian's postgresql installed)")
    from hpsearch.study.storage import redact, server_url

    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(server_url(url), connect_args={"connect_timeout": 5})
        with engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - the variable promises a server: say why it is not there
        pytest.fail(f"HPSEARCH_TEST_POSTGRES={redact(url)} is set but unusable: {str(exc).splitlines()[0]}")
    return url


# ----------------------------------------------------------------------------------------------
# Worker processes (tests/test_reliability.py, test_postgres.py): a small space so that a trial
# on a small synthetic dataset lasts about a second, and heartbeats shortened (1 s beat, 5 s grace).

WORKER_ENV = {**os.environ, "HPSEARCH_HEARTBEAT_INTERVAL": "1", "HPSEARCH_GRACE_PERIOD": "5", "OMP_NUM_THREADS": "1",
              "PYTHONUNBUFFERED": "1"}
WORKER_SPACE = """
[params.num_layers]
type = "int"
low = 2
high = 3
[params.layer_size]
type = "int"
low = 16
high = 96
[params.lr]
type = "float"
low = 1e-3
high = 1e-2
log = true
[params.activation]
type = "categorical"
choices = ["relu", "tanh"]
[fixed]
batch_size = 32
optimizer = "adamw"
"""


def worker_files(root: Path, n_train: int) -> tuple[Path, Path]:
    """A synthetic IDX dataset of n_train images and WORKER_SPACE as a file, under root."""
    data = make_idx_dir(root / "data", n_train=n_train, n_test=50)
    space = root / "space.toml"
    space.write_text(WORKER_SPACE)
    return data, space


def start(args, cwd) -> subprocess.Popen:
    """A worker process (`python -m hpsearch run ...` as ARGS) in WORKER_ENV."""
    return subprocess.Popen(args, cwd=cwd, env=WORKER_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def load(storage, study):
    import optuna

    return optuna.load_study(study_name=study, storage=storage)


def states(study) -> dict:
    """How many of the study's trials are in each state, by name."""
    from optuna.trial import TrialState

    return {s.name: sum(t.state == s for t in study.trials) for s in TrialState}

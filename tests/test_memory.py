"""A space that allows configurations too big for the machine: those trials fail in one line
before anything is allocated, the others train, and the study reaches its target."""

import subprocess
import sys

import optuna

from hpsearch.specs import ModelSpec
from hpsearch.train.memory import training_bytes

SPACE = """
[params.num_layers]
type = "categorical"
choices = [1, 32]

[fixed]
layer_size = 16384
"""

# The child caps its own address space first (a real limit, as `ulimit -v` sets): without the
# estimate, 32 layers of 16,384 units (8.6e9 parameters, 34 GB of weights) fail in the allocator
# and end the run with "unexpected RuntimeError".
CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))
sys.argv = ["hpsearch", *sys.argv[1:]]
from hpsearch.cli import main
main()
"""


def test_too_big_configs_fail_alone_and_the_study_goes_on(fashion_dir, tmp_path):
    (tmp_path / "space.toml").write_text(SPACE)
    storage = f"sqlite:///{tmp_path}/s.db"
    done = subprocess.run([sys.executable, "-c", CHILD, "run", "--study", "m", "--trials", "3", "--epochs", "1",
                           "--subset", "600", "--space", "space.toml", "--sampler", "random", "--no-start",
                           "--storage", storage, "--data-dir", str(fashion_dir), "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="m", storage=storage).trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    finished = [t for t in trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) == 3 and all(t.params["num_layers"] == 1 for t in finished)
    assert failed and all(t.params["num_layers"] == 32 for t in failed)
    assert all(t.user_attrs["stop_reason"].startswith("needs about") for t in failed)
    assert "failed, not trained further: needs about" in done.stdout


def test_the_estimate_bounds_what_training_measured():
    """Measured on this project's CPU (train_one, one epoch, peak RSS above the loaded data):
    4 layers of 4,096 units at batch 64 took 988 MiB; the seeds' CNN at batch 256, 290 MiB."""
    mlp = ModelSpec(num_layers=4, layer_size=4096)
    cnn = ModelSpec(family="cnn", conv_blocks=2, channels=64, num_layers=2, layer_size=256)
    assert training_bytes(mlp, 64) >= 988 << 20
    assert training_bytes(cnn, 256) >= 290 << 20
    assert training_bytes(ModelSpec(num_layers=32, layer_size=16384), 64) > 200 << 30

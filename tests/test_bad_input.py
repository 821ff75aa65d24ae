"""Hostile and broken input: one clear line on stderr, a non-zero exit, the storage and earlier
results untouched, no traceback unless --debug.

Most cases call the real entry point (`hpsearch.cli.main`) in-process, which is what the
`hpsearch` script runs, to keep the suite fast; the environment failures (read-only folder, full
disk) run real processes in a private mount namespace, where a read-only bind mount and a tiny
tmpfs fail for root too (chmod does not stop root).
"""

import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch

from conftest import make_idx_dir, write_idx
from hpsearch.data import read_idx
from hpsearch.errors import HPSearchError

optuna.logging.set_verbosity(optuna.logging.ERROR)
HPSEARCH = [sys.executable, "-m", "hpsearch"]
SPACE = textwrap.dedent("""
    [params.layer_size]
    type = "int"
    low = 16
    high = 64
    [params.lr]
    type = "float"
    low = 1e-3
    high = 1e-2
    log = true
    [fixed]
    batch_size = 32
    num_layers = 2
""")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small dataset, a search space, and a study with two finished trials plus earlier results."""
    from hpsearch.search import RunSettings, run_study

    root = tmp_path_factory.mktemp("bad")
    data = make_idx_dir(root / "data", n_train=300, n_test=50)
    space = root / "space.toml"
    space.write_text(SPACE)
    (root / "results").mkdir()
    (root / "results" / "keep.txt").write_text("earlier results")
    storage = f"sqlite:///{root}/studies/s.db"
    run_study(RunSettings(trials=2, study="base", storage=storage, dataset="idx", data_dir=str(data),
                          space=str(space), epochs=2, device="cpu", pruner="none"))
    return SimpleNamespace(root=root, data=data, space=space, storage=storage)


def snapshot(world):
    study = optuna.load_study(study_name="base", storage=world.storage)
    trials = [(t.number, t.state, t.value, t.params, t.datetime_complete) for t in study.trials]
    results = {p.name: p.read_bytes() for p in (world.root / "results").rglob("*") if p.is_file()}
    return trials, study.user_attrs, optuna.get_all_study_names(world.storage), results


def cli(capsys, *args):
    """Run `hpsearch ARGS` through the real entry point; (exit code, stdout, stderr)."""
    import hpsearch.cli as cli_mod

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    argv = sys.argv
    sys.argv = ["hpsearch", *map(str, args)]
    try:
        cli_mod.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        for s, handler in saved.items():
            signal.signal(s, handler)
        cli_mod._DEBUG["on"] = False
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code, err, needle):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def run_args(world, **overrides):
    args = {"dataset": "idx", "data-dir": world.data, "space": world.space, "epochs": 2, "trials": 3,
            "storage": world.storage, "study": "base", "device": "cpu"}
    args.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return ["run"] + [x for k, v in args.items() if v is not None for x in (f"--{k}", v)]


# ---- hostile files, written by the tests ------------------------------------------------------


def data_dir(world, tmp_path, damage):
    d = tmp_path / "data"
    shutil.copytree(world.data, d)
    damage(d)
    return d


def _truncate(d):
    f = d / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[: 5000])


def _wrong_magic(d):
    f = d / "train-labels-idx1-ubyte"
    f.write_bytes(b"\x89PNG" + f.read_bytes()[4:])


def _count_mismatch(d):
    write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(49, dtype=np.uint8))


def _bad_gzip(d):
    (d / "train-images-idx3-ubyte").unlink()
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")


def _overflowing_header(d):
    f = d / "train-images-idx3-ubyte"
    f.write_bytes(struct.pack(">HBB3I", 0, 8, 3, 2**31, 2**31, 4) + b"\0" * 64)


def _no_images(d):
    write_idx(d / "train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    write_idx(d / "train-labels-idx1-ubyte", np.zeros(0, np.uint8))


def _a_class_per_image(d):  # 60 training images in 60 classes: nothing per class to hold out
    write_idx(d / "train-images-idx3-ubyte", np.zeros((60, 28, 28), np.uint8))
    write_idx(d / "train-labels-idx1-ubyte", np.arange(60, dtype=np.uint8))
    write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(len(read_idx(d / "t10k-labels-idx1-ubyte")), np.uint8))


DATA_CASES = {
    "overflowing header": (_overflowing_header, "hpsearch reads IDX files of up to 1 GiB"),
    "no images": (_no_images, "holds no images"),
    "a class per image": (_a_class_per_image, "leave 0 for validation"),
    # (data.py names the missing file for the named datasets, but not yet for --dataset idx)
    "missing file": (lambda d: (d / "t10k-labels-idx1-ubyte").unlink(), "t10k-labels-idx1-ubyte (raw or .gz)"),
    "truncated": (_truncate, "is truncated"),
    "wrong magic": (_wrong_magic, "bad magic number 89504e47"),
    "label/image count mismatch": (_count_mismatch, "50 test images but 49 labels"),
    "corrupt gzip": (_bad_gzip, "cannot read"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_broken_data_directory(world, tmp_path, capsys, case):
    damage, needle = DATA_CASES[case]
    before = snapshot(world)
    code, _, err = cli(capsys, *run_args(world, data_dir=data_dir(world, tmp_path, damage)))
    assert_one_line(code, err, needle)
    assert snapshot(world) == before


SPACE_CASES = {
    "unknown activation": ('[params.activation]\ntype = "categorical"\nchoices = ["relu", "swish"]\n', "activation = 'swish'"),
    "malformed toml": ('[params.lr\ntype = "float"\n', "is not valid TOML"),
    "lr out of range": ('[params.lr]\ntype = "float"\nlow = 0.0\nhigh = 0.1\n', "lr = 0.0 is not in range"),
    "layer_size out of range": ('[params.layer_size]\ntype = "int"\nlow = 0\nhigh = 8\n', "layer_size = 0"),
    "low above high": ('[params.lr]\ntype = "float"\nlow = 0.1\nhigh = 0.01\n', "is above high"),
    "unknown parameter": ('[params.momentumm]\ntype = "float"\nlow = 0.1\nhigh = 0.9\n', "unknown parameter 'momentumm'"),
    "empty file": ("", "declares no [params.NAME] tables"),
    "binary junk": ("\x00\x01\x02\xff", "search space"),
    "int with a fractional step": ('[params.layer_size]\ntype = "int"\nlow = 32\nhigh = 64\nstep = 2.5\n',
                                   "its step must be a whole number (got 2.5)"),
    "a 2 MB string": ('[params.activation]\ntype = "categorical"\nchoices = ["' + "x" * (2 << 20) + '"]\n',
                      "activation = 'xxxxxxxx"),
}


@pytest.mark.parametrize("case", list(SPACE_CASES))
def test_bad_search_space(world, tmp_path, capsys, case):
    text, needle = SPACE_CASES[case]
    space = tmp_path / "space.toml"
    space.write_bytes(text.encode("latin-1"))
    before = snapshot(world)
    code, _, err = cli(capsys, *run_args(world, space=space))
    assert_one_line(code, err, needle)
    assert len(err) < 1000  # whatever the file holds
    assert snapshot(world) == before


FLAG_CASES = {
    "unknown dataset": ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
    "zero trials": ({"trials": 0}, "--trials must be at least 1"),
    "negative trials": ({"trials": -3}, "--trials must be at least 1"),
    "trials not a number": ({"trials": "many"}, "Invalid value for '--trials'"),
    "zero epochs": ({"epochs": 0}, "--epochs must be at least 1"),
    "zero workers": ({"workers": 0}, "--workers must be between 1 and 256"),
    "zero timeout": ({"timeout": 0}, "--timeout must be positive"),
    "val fraction": ({"val_fraction": 1.5}, "--val-fraction must be between 0 and 1"),
    "tiny subset": ({"subset": 5}, "--subset must be between 20"),
    "unknown device": ({"device": "tpu"}, "unknown device 'tpu'"),
    "missing data dir": ({"data_dir": "/nonexistent/dir"}, "is not a directory"),
    "missing space file": ({"space": "/nonexistent/space.toml"}, "cannot read search space"),
    "unknown flag": ({"trails": 3}, "No such option: --trails"),
    "study with slash": ({"study": "a/b"}, "invalid study name 'a/b'"),
    "study dot-dot": ({"study": ".."}, "invalid study name '..'"),
    "study escaping": ({"study": "../../etc/x"}, "invalid study name"),
    "study hidden": ({"study": ".hidden"}, "invalid study name"),
    "study backslash": ({"study": "a\\b"}, "invalid study name"),
    "study empty": ({"study": ""}, "invalid study name ''"),
    "study too long": ({"study": "x" * 200}, "invalid study name"),
    "malformed storage": ({"storage": "notadb://x"}, "cannot open storage 'notadb://x'"),
    # psycopg 3 is hpsearch's driver; psycopg2 is not installed (test_postgres.py simulates a missing psycopg)
    "server without driver": ({"storage": "postgresql+psycopg2://me:s3cret@127.0.0.1:1/db"},
                              "no database driver for postgresql+psycopg2; hpsearch uses psycopg 3: write postgresql://"),
    "storage under /proc": ({"storage": "sqlite:////proc/hpsearch-none/x.db"}, "cannot write in /proc/hpsearch-none"),
    "journal without file": ({"storage": "journal:"}, "names no file"),
    "study measures something else": ({"epochs": 5}, "was created with --epochs 2;"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flags(world, capsys, case):
    overrides, needle = FLAG_CASES[case]
    before = snapshot(world)
    code, _, err = cli(capsys, *run_args(world, **overrides))
    assert_one_line(code, err, needle)
    assert "s3cret" not in err  # passwords never printed
    assert snapshot(world) == before


def test_a_file_that_is_not_a_database(world, tmp_path, capsys):
    junk = tmp_path / "notes.db"
    junk.write_text("these are my notes, not a database\n" * 100)
    before = snapshot(world)
    code, _, err = cli(capsys, *run_args(world, storage=f"sqlite:///{junk}"))
    assert_one_line(code, err, "file is not a database")
    assert junk.read_text().startswith("these are my notes") and snapshot(world) == before
    code, _, err = cli(capsys, "studies", "--storage", f"sqlite:///{junk}")
    assert_one_line(code, err, "file is not a database")


def test_bad_heartbeat_settings(world, capsys, monkeypatch):
    monkeypatch.setenv("HPSEARCH_HEARTBEAT_INTERVAL", "10")
    monkeypatch.setenv("HPSEARCH_GRACE_PERIOD", "15")
    code, _, err = cli(capsys, *run_args(world))
    assert_one_line(code, err, "HPSEARCH_GRACE_PERIOD (15s) must be at least twice")


def test_debug_shows_the_traceback_and_bugs_are_one_line_without_it(world, capsys, monkeypatch):
    with pytest.raises(HPSearchError, match="--trials must be at least 1"):
        cli(capsys, "--debug", *run_args(world, trials=0))
    from hpsearch import search

    def boom(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(search, "continue_settings", boom)
    code, _, err = cli(capsys, *run_args(world))
    assert_one_line(code, err, "unexpected RuntimeError: something inside broke (rerun with --debug")
    assert code == 1


# ---- security --------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    from PIL import Image

    from hpsearch.checkpoint import load_model

    marker = tmp_path / "pwned"
    evil = tmp_path / "best_model.pt"
    torch.save({"format": "hpsearch-checkpoint", "version": 1, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(HPSearchError, match="refused"):
        load_model(evil)
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    code, _, err = cli(capsys, "predict", image, "--checkpoint", evil)
    assert_one_line(code, err, "refused")
    code, _, err = cli(capsys, "export", "--checkpoint", evil, "--format", "pt", "--out", tmp_path / "copy.pt")
    assert_one_line(code, err, "refused")
    assert not marker.exists() and not (tmp_path / "copy.pt").exists()


def test_checkpoints_are_only_loaded_weights_only():
    import hpsearch

    calls = []
    for source in Path(hpsearch.__file__).parent.rglob("*.py"):
        text = source.read_text()
        calls += [(source.name, text[i:text.find(")", i) + 1]) for i in range(len(text)) if text.startswith("torch.load(", i)]
    assert calls
    for name, call in calls:
        assert "weights_only=True" in call, f"{name}: {call}"


def test_study_names_cannot_leave_results_and_dashboard_is_local(world, capsys):
    import inspect

    from hpsearch import cli as cli_mod
    from hpsearch.dashboard import make_dashboard_server
    from hpsearch.config import check_study_name

    for name in ("../x", "..", "a/b", "/etc", ".git", "a\\..\\b", "x\n", " ", "c:evil"):
        with pytest.raises(HPSearchError):
            check_study_name(name)
    code, _, err = cli(capsys, "report", "--storage", world.storage, "--study", "../../tmp/x", "--no-retrain")
    assert_one_line(code, err, "invalid study name")
    assert inspect.signature(make_dashboard_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(cli_mod.dashboard).parameters["host"].default.default == "127.0.0.1"


# ---- the environment fails: read-only folders, a full disk -------------------------------------


def _private_mounts():
    """Root: a private mount namespace (unshare -m) where ro binds and a tiny tmpfs are real."""
    if os.geteuid() != 0:
        return False
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


needs_mounts = pytest.mark.skipif(not _private_mounts(), reason="needs root and mount namespaces (unshare -m)")


def in_namespace(script, cwd, timeout=240):
    """Run a shell script in a private mount namespace (its mounts vanish with it)."""
    return subprocess.run(["unshare", "-m", "sh", "-euc", script], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HPSEARCH_HEARTBEAT_INTERVAL": "1",
                                                "HPSEARCH_GRACE_PERIOD": "3"})


def stderr_of(output, tag):
    """The stderr a script step saved in its files."""
    return (Path(output) / f"{tag}.err").read_text()


@needs_mounts
def test_read_only_studies_and_results_folders(world, tmp_path):
    studies, results = Path(world.storage[len("sqlite:///"):]).parent, world.root / "results"
    before = snapshot(world)
    run = " ".join(f"'{a}'" for a in HPSEARCH + run_args(world, trials=4))
    report = " ".join(f"'{a}'" for a in HPSEARCH + ["report", "--storage", world.storage, "--study", "base",
                                                     "--no-retrain", "--out", str(results / "base")])
    listing = " ".join(f"'{a}'" for a in HPSEARCH + ["studies", "--storage", world.storage, "--json"])
    out = tmp_path
    proc = in_namespace(f"""
        for d in '{studies}' '{results}'; do mount --bind "$d" "$d"; mount -o remount,bind,ro "$d"; done
        set +e
        {run} > {out}/run.out 2> {out}/run.err; echo $? > {out}/run.rc
        {listing} > {out}/list.out 2> {out}/list.err; echo $? > {out}/list.rc
        {report} > {out}/report.out 2> {out}/report.err; echo $? > {out}/report.rc
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert int((out / "run.rc").read_text()) == 2
    assert_one_line(2, stderr_of(out, "run"), f"cannot write in {studies}: Read-only file system")
    assert int((out / "list.rc").read_text()) == 0, stderr_of(out, "list")  # reading still works
    assert '"complete": 2' in (out / "list.out").read_text()
    assert int((out / "report.rc").read_text()) != 0
    assert_one_line(1, stderr_of(out, "report"), "Read-only file system")
    assert snapshot(world) == before


@needs_mounts
def test_full_disk_during_a_run_and_while_writing_a_checkpoint(world, tmp_path):
    """The study database on a 2 MB tmpfs filled up to 150 KB: the run stops with one line, the
    finished trials stay; with space again, the same command finishes the study (the trial that
    was running when the disk filled is recovered and retried). A checkpoint written onto the full
    disk fails cleanly: the earlier checkpoint is intact and no temporary file is left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    storage = f"sqlite:///{disk}/s.db"

    def command(trials):
        return " ".join(f"'{a}'" for a in HPSEARCH + run_args(world, storage=storage, study="full", trials=trials, epochs=3))
    ckpt = textwrap.dedent(f"""
        import glob, os, sys
        from hpsearch.checkpoint import load_model, save_checkpoint
        from hpsearch.models import ModelSpec, NeuralNetwork
        small = NeuralNetwork.from_spec(ModelSpec(num_layers=2, layer_size=8))
        save_checkpoint("{disk}/model.pt", small)
        big = NeuralNetwork.from_spec(ModelSpec(num_layers=3, layer_size=512))
        try:
            save_checkpoint("{disk}/model.pt", big)
            print("saved?!")
        except BaseException as exc:
            print("failed", type(exc).__name__, str(exc).splitlines()[0][:100])
        print("intact", load_model("{disk}/model.pt").spec.layer_size == 8)
        print("leftovers", sorted(os.path.basename(p) for p in glob.glob("{disk}/.model.pt*")))
    """)
    (tmp_path / "ckpt.py").write_text(ckpt)
    export = " ".join(f"'{a}'" for a in HPSEARCH + ["export", "--checkpoint", f"{disk}/model.pt", "--format", "pt",
                                                     "--out", f"{disk}/copy.pt"])
    proc = in_namespace(f"""
        mount -t tmpfs -o size=2m tmpfs '{disk}'
        {command(2)} > /dev/null
        fill() {{ avail=$(df --output=avail -B1 '{disk}' | tail -1); head -c $((avail - $1)) /dev/zero >> '{disk}/filler' || true; }}
        fill 150000
        set +e
        {command(30)} > {out}/full.out 2> {out}/full.err; echo $? > {out}/full.rc
        cp '{disk}/s.db' {out}/during.db
        rm '{disk}/filler'
        {command(6)} > {out}/rerun.out 2> {out}/rerun.err; echo $? > {out}/rerun.rc
        cp '{disk}/s.db' {out}/after.db
        fill 60000
        '{sys.executable}' {tmp_path}/ckpt.py > {out}/ckpt.out 2> {out}/ckpt.err
        fill 0
        {export} > {out}/export.out 2> {out}/export.err; echo $? > {out}/export.rc
        ls -a '{disk}' > {out}/ls.out
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    # the run on the full disk: one line, exit 2, finished trials kept
    assert int((out / "full.rc").read_text()) == 2
    assert_one_line(2, stderr_of(out, "full"), "database or disk is full")
    during = optuna.load_study(study_name="full", storage=f"sqlite:///{out}/during.db")
    assert sum(t.state.is_finished() and t.state.name != "FAIL" for t in during.trials) >= 2
    # with space again: exactly 6 finished, nothing RUNNING
    assert int((out / "rerun.rc").read_text()) == 0, stderr_of(out, "rerun")
    after = optuna.load_study(study_name="full", storage=f"sqlite:///{out}/after.db")
    states = [t.state.name for t in after.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 6 and "RUNNING" not in states
    # the checkpoint: the write failed, the earlier file is intact, no temporary file left behind
    report = (out / "ckpt.out").read_text()
    assert "failed" in report and "intact True" in report and "leftovers []" in report, report + stderr_of(out, "ckpt")
    assert int((out / "export.rc").read_text()) != 0
    assert "Traceback" not in stderr_of(out, "export") and len(stderr_of(out, "export").strip().splitlines()) == 1
    assert "copy.pt" not in (out / "ls.out").read_text().split()

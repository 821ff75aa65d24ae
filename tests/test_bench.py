import json
import subprocess
import sys

from hpsearch.bench import run_bench


def test_bench_measures_every_way_in_one_run(fashion_dir):
    res = run_bench(device="cpu", models=("3x128",), populations=(2,), seconds=0.3, subset=2000)
    (model,) = res["models"]
    names = [r["name"] for r in model["rows"]]
    assert names == ["seeds", "eager", "hpsearch", "hpsearch-big", "pop-2"]
    for r in model["rows"]:
        assert r["samples_per_s"] > 0 and r["model_epochs_per_s"] == r["samples_per_s"] / res["train_samples"]
    assert model["rows"][0]["vs_seeds"] == 1.0 and model["rows"][1]["vs_eager"] == 1.0
    assert model["rows"][-1]["models"] == 2
    assert res["matmul_flops"] > 1e8 and model["roofline_model_epochs_per_s"] > 0


def test_bench_cli_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpsearch", "bench", "--device", "cpu", "--json", "--quick",
                           "--models", "3x128", "--population", "2", "--subset", "1000"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["models"][0]["model"] == "3x128" and out["models"][0]["hpsearch_vs_seeds"] > 0


def test_bench_rejects_bad_options(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpsearch", "bench", "--models", "9x9"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "unknown bench model" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_times_mixed_shapes_under_each_grouping(fashion_dir):
    res = run_bench(device="cpu", models=(), populations=(), seconds=0.2, subset=1000, mixed=3)
    rows = {g["grouping"]: g for g in res["grouping"]}
    assert set(rows) == {"batch", "width", "shape"}
    assert rows["batch"]["groups"] == 1 and rows["shape"]["groups"] == 3
    assert rows["shape"]["useful_flop_share"] == 1.0 and rows["batch"]["useful_flop_share"] < 1.0
    assert all(g["model_epochs_per_s"] > 0 for g in rows.values())


def test_bench_cnn_rows(fashion_dir):
    res = run_bench(device="cpu", models=("cnn",), populations=(2,), seconds=0.3, subset=1000)
    (model,) = res["models"]
    names = [r["name"] for r in model["rows"]]
    assert names == ["seeds", "eager", "hpsearch", "eager-cl", "hpsearch-cl", "hpsearch-nchw", "hpsearch-1t", "pop-2"]
    assert all(r["samples_per_s"] > 0 for r in model["rows"])
    # a convolution's FLOPs count once per pixel: the seeds' CNN costs far more per image than 3x128
    from hpsearch.bench import BENCH_MODELS, model_flops_per_sample
    from hpsearch.data import load_dataset

    data = load_dataset("fashion-mnist", fashion_dir, "cpu", subset=1000)
    assert model["model_flops_per_sample"] > 20 * model_flops_per_sample(data, BENCH_MODELS["3x128"])

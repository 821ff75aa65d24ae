"""`hpsearch doctor` on a CPU-only machine: it says there is no GPU to check, and exits 0."""

import importlib.metadata
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_one_line_error, cli
from hpsearch import doctor
from hpsearch.train import PopulationTrainer, graphcheck
from hpsearch.train.group import Group

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only report")


@needs_no_gpu
def test_text_report_names_versions_no_gpu_and_throughput_on_real_data(monkeypatch, capsys, fashion_dir):
    code, out, err = cli(["doctor", "--seconds", "0.3", "--data-dir", str(fashion_dir)], monkeypatch, capsys)
    assert code == 0 and err == "", err
    lines = out.splitlines()
    assert lines[0] == "hpsearch doctor (paste this into a bug report)"
    field = {line[:12].strip(): line[13:] for line in lines[1:] if not line.startswith(" ")}
    assert field["torch"].startswith(torch.__version__)
    assert field["optuna"].startswith(importlib.metadata.version("optuna"))
    assert field["cuda"].startswith("not available")
    assert field["graph check"] == "no GPU: nothing to check; training runs eagerly on the CPU"
    assert " samples/s on cpu (eager): mlp 3x128 relu, adamw lr 1e-3, batch 128, one trial" in field["throughput"]
    assert f"5,400 images of fashion-mnist subset from {fashion_dir}" in field["throughput"]


@needs_no_gpu
def test_json_report_with_synthetic_data_when_there_is_none(monkeypatch, capsys, tmp_path):
    code, out, err = cli(["doctor", "--json", "--seconds", "0.3", "--data-dir", str(tmp_path)], monkeypatch, capsys)
    assert code == 0 and err == "", err
    report = json.loads(out)
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["python"]
    assert report["cuda"]["available"] is False and report["cuda"]["devices"] == []
    assert report["graph_check"] == {"status": "no-gpu", "message": doctor.NO_GPU, "checks": []}
    t = report["throughput"]
    assert t["samples_per_second"] > 0 and t["epochs"] >= 1 and t["path"] == "eager" and t["device"] == "cpu"
    assert t["data"].startswith("synthetic images (no real data: fashion-mnist not found in ") and t["train_images"] == 6000


@needs_no_gpu
@pytest.mark.parametrize("args,fragment", [(["--device", "cuda"], "no CUDA GPU is available"),
                                           (["--seconds", "0"], "--seconds must be positive")])
def test_bad_flags_are_one_line(monkeypatch, capsys, args, fragment):
    code, out, err = cli(["doctor", *args], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(code, err, fragment)


def test_a_failing_section_is_one_line_and_the_report_goes_on(monkeypatch):
    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")

    monkeypatch.setattr(doctor, "measure_throughput", broken)
    monkeypatch.setattr(doctor, "graph_self_check", broken)
    report = doctor.run_doctor("cpu", None, 0.1)
    error = "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert report["throughput"] == report["graph_check"] == {"error": error}
    assert doctor.format_report(report).splitlines()[-2:] == [f"graph check  could not run: {error}",
                                                              f"throughput   not measured: {error}"]


# The GPU section, run on the CPU: the trainer given fake graphs (tests/test_gpu_check.py) as a
# GPU would record real ones.


@pytest.fixture
def cpu_graphs(monkeypatch):
    monkeypatch.setattr(graphcheck, "_VERDICTS", {})

    def trainer(data, precision, note):
        t = PopulationTrainer(data, note=note)
        t.use_graphs = True  # past the CUDA-only guard
        return t

    monkeypatch.setattr(doctor, "_trainer", trainer)
    how = {"step": lambda group: group.step()}
    monkeypatch.setattr(Group, "record_graph", lambda group: SimpleNamespace(replay=lambda: how["step"](group)))
    return how


def test_gpu_self_check_section_reports_each_family(cpu_graphs):
    section = doctor.run_graph_checks(torch.device("cpu"), ["fp32"])
    assert section["status"] == "passed" and section["message"] == "passed: training replays CUDA graphs"
    assert [(c["precision"], c["family"], c["passed"], c["path"]) for c in section["checks"]] == [
        ("fp32", "mlp", True, "cuda-graph"), ("fp32", "mlp-bn", True, "cuda-graph"), ("fp32", "cnn", True, "cuda-graph")]
    report = {"hpsearch": "x", "versions": doctor.versions(), "platform": doctor.machine(), "cuda": doctor.cuda_devices(),
              "graph_check": section, "throughput": {"error": "skipped"}}
    assert "  fp32 cnn: passed (max rel diff 0.0e+00, tolerance 1e-03); trains on cuda-graph" in \
           doctor.format_report(report).splitlines()


def test_gpu_self_check_section_reports_a_failure(cpu_graphs):
    def nudged(group):
        group.step()
        with torch.no_grad():
            group.W[-1][0, 0, 0] += 1e-2

    cpu_graphs["step"] = nudged
    section = doctor.run_graph_checks(torch.device("cpu"), ["fp32"])
    assert section["status"] == "failed"
    assert section["message"] == "FAILED for fp32 mlp, fp32 mlp-bn, fp32 cnn: those train eagerly (slower, still correct)"
    for check in section["checks"]:
        assert not check["passed"] and check["path"] == "eager (graph check failed)"
        assert check["notes"] == [f"CUDA graph check failed on cpu (fp32, {check['family']}; {check['summary']}): "
                                  f"training eagerly"]

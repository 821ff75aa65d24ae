"""The multi-machine recipes in examples/ run valid `hpsearch run` commands.

The Slurm script runs under bash with `hpsearch` replaced by a function that records its
arguments (so they are exactly what bash would pass); the Kubernetes Job is parsed with PyYAML
and its `$(VAR)` references expanded as the kubelet does. Each command line is then parsed by the
real `hpsearch run` (typer) without running, and its settings checked as `run` checks them.
"""

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SAMPLE_URL = "postgresql://hpsearch:s3cret@db.example.org:5432/hpsearch"


def parse_run(argv: list[str]):
    """The click context of `hpsearch run ARGV` (raises on an unknown flag or a bad value)."""
    import typer.main

    from hpsearch.cli import app

    assert argv[:1] == ["run"], argv
    group = typer.main.get_command(app)
    return group.get_command(None, "run").make_context("run", list(argv[1:]))


def check_run(argv: list[str]) -> dict:
    """A valid multi-machine `hpsearch run`: flags and values parse, the settings validate, and the
    storage is a PostgreSQL URL hpsearch's driver serves; returns the parsed options."""
    from hpsearch.config import RunSettings, resolve_workers
    from hpsearch.space import load_space
    from hpsearch.study.storage import PG_DIALECT, server_url

    ctx = parse_run(argv)
    params = ctx.params
    fields = {f.name for f in dataclasses.fields(RunSettings)}
    RunSettings(**{k: v for k, v in params.items() if k in fields}).validate()
    resolve_workers(params["workers"], params["device"])
    if params["space"] is not None:
        load_space(params["space"])
    for flag in ("storage", "study", "trials"):  # what a shared study needs spelled out
        assert ctx.get_parameter_source(flag).name == "COMMANDLINE", f"--{flag} not given: {argv}"
    assert server_url(params["storage"]).startswith(PG_DIALECT + "://"), params["storage"]
    return params


def slurm_commands(task_id: int, tmp_path: Path) -> list[list[str]]:
    """The argument lists of every `hpsearch` call the Slurm script makes in array task `task_id`."""
    script = EXAMPLES / "slurm-array.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    record = tmp_path / f"calls-{task_id}"
    stub = 'n=0; hpsearch() { n=$((n+1)); printf "%s\\0" "$@" > "$RECORD.$n"; }; srun() { "$@"; }; source "$1"'
    env = {"PATH": "/usr/bin:/bin", "HPSEARCH_STORAGE": SAMPLE_URL, "RECORD": str(record),
           "SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_SUBMIT_DIR": str(tmp_path)}
    subprocess.run(["bash", "-c", stub, "slurm", str(script)], env=env, check=True, timeout=30)
    calls = sorted(tmp_path.glob(f"calls-{task_id}.*"), key=lambda p: int(p.suffix[1:]))
    return [p.read_bytes().decode().split("\0")[:-1] for p in calls]


def test_slurm_array_runs_one_study_from_every_task(tmp_path):
    text = (EXAMPLES / "slurm-array.sh").read_text()
    assert re.search(r"^#SBATCH --array=\d+-\d+", text, re.M)
    first, other = slurm_commands(0, tmp_path), slurm_commands(5, tmp_path)
    assert len(first) == 1 and first == other  # one worker per task, the same command in every task
    params = check_run(first[0])
    assert params["storage"] == SAMPLE_URL and params["device"] == "auto"


def test_slurm_array_refuses_to_start_without_a_storage(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(["bash", "-c", 'hpsearch() { echo RAN; }; source "$1"', "slurm",
                           str(EXAMPLES / "slurm-array.sh")], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "RAN" not in done.stdout and "HPSEARCH_STORAGE" in done.stderr


def _expand(value: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def test_k8s_indexed_job_runs_one_study_from_every_pod():
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "k8s-indexed-job.yaml").read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "Job"]
    assert len(jobs) == 1 and jobs[0]["apiVersion"] == "batch/v1"
    spec = jobs[0]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert isinstance(spec["completions"], int) and isinstance(spec["parallelism"], int)
    assert 1 <= spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    (container,) = pod["containers"]
    env_vars = {e["name"]: e for e in container["env"]}
    # the URL (and its password) comes from a Secret, never from the file
    assert env_vars["HPSEARCH_STORAGE"]["valueFrom"]["secretKeyRef"]["key"]
    assert "value" not in env_vars["HPSEARCH_STORAGE"]
    argv = [_expand(str(a), {"HPSEARCH_STORAGE": SAMPLE_URL}) for a in container["command"] + container["args"]]
    assert argv[0] == "hpsearch"
    assert all(isinstance(a, str) for a in container["args"])  # numbers quoted: Kubernetes wants strings
    params = check_run(argv[1:])
    assert params["storage"] == SAMPLE_URL and params["device"] == "auto"


@pytest.mark.parametrize("argv, needle", [
    (["run", "--trails", "3", "--storage", SAMPLE_URL, "--study", "s"], "No such option"),
    (["run", "--trials", "many", "--storage", SAMPLE_URL, "--study", "s"], "integer"),
    (["run", "--trials", "0", "--storage", SAMPLE_URL, "--study", "s"], "--trials must be at least 1"),
    (["run", "--trials", "3", "--storage", "sqlite:///x.db", "--study", "s"], "sqlite"),
    (["run", "--trials", "3", "--storage", SAMPLE_URL], "--study not given"),
])
def test_the_check_catches_bad_commands(argv, needle):
    with pytest.raises(Exception, match=re.escape(needle)):
        check_run(argv)

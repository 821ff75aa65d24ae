"""The search against the obvious alternatives, on one machine, in one run.

    .venv/bin/python benchmarks/search.py [--budgets 120,300,600] [--methods default,random]
        [--subset N] [--seed S[,S...]] [--out DIR] [--json]

For each wall-clock budget (seconds of `hpsearch run --timeout`), on the full Fashion-MNIST
training split unless --subset is given:
  default   `hpsearch run` with the shipped space and settings (starting configurations first)
  random    random search over the same space, without the starting configurations
  halving, hyperband, margin  (on request) the default study with --pruner halving / hyperband /
            median-margin
  gp        (on request) the default study with --sampler gp
  cnn       (on request) the study of the CNN space (`hpsearch run --space cnn`, its own starts):
            the other family at the same budget, against the same MLP starts
and once, for reference:
  starts    the space's [[start]] configurations, each trained alone for the full epoch budget
            (the same seeds as in a study, so the same models)
Each study's best trial is then tested by `hpsearch report` (its own weights, kept by the search;
not counted in the budget). Printed: trials finished, best validation accuracy reached by 1/4,
1/2 and all of the budget, the best model's test accuracy; the JSON has every number.
With several seeds (`--seed 0,1,2`: each a different validation split, trial seeds and sampler
seed) everything runs once per seed, and a last table gives, per budget and method, the mean
test accuracy and the mean and worst gain over the best start: one 10k-image test split moves
by ~0.3 points between models of equal quality, so targets of that size need several seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = {"default": [], "random": ["--sampler", "random", "--no-start"],
           # the default study with another pruner (--methods default,halving,hyperband)
           "halving": ["--pruner", "halving"], "hyperband": ["--pruner", "hyperband"],
           "margin": ["--pruner", "median-margin"],
           # the default study with Optuna's Gaussian-process sampler (needs scipy: pip install -e .[gp])
           "gp": ["--sampler", "gp"],
           # the CNN family's shipped space and starts (--methods default,cnn: which family per minute)
           "cnn": ["--space", "cnn"]}


def _hpsearch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpsearch", *args], cwd=cwd, capture_output=True, text=True)


def _best_so_far(storage: str, study: str, budget: float) -> dict:
    import optuna

    trials = optuna.load_study(study_name=study, storage=storage).trials
    starts = [t.datetime_start for t in trials if t.datetime_start]
    done = [((t.datetime_complete - min(starts)).total_seconds(), t.value) for t in trials
            if t.state.name == "COMPLETE" and t.value is not None]
    finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)

    def best_by(seconds: float) -> float | None:
        values = [v for at, v in done if at <= seconds]
        return max(values) if values else None

    return {"finished": finished, "complete": len(done),
            "best_val_by": {f: best_by(budget * f) for f in (0.25, 0.5, 1.0)},
            "best_val": max((v for _, v in done), default=None)}


def run_method(method: str, budget: int, out: Path, subset: int | None, seed: int = 0) -> dict:
    study, storage = f"{method}-{budget}" + (f"-s{seed}" if seed else ""), f"sqlite:///{out}/bench.db"
    data = (["--subset", str(subset)] if subset else []) + ["--seed", str(seed)]
    start = time.perf_counter()
    run = _hpsearch(["run", "--timeout", str(budget), "--trials", "100000", "--study", study,
                     "--storage", storage, *data, *METHODS[method]], out)
    row = {"method": method, "budget_s": budget, "wall_s": round(time.perf_counter() - start, 1)}
    if run.returncode != 0:
        return {**row, "error": (run.stderr.strip().splitlines() or ["?"])[-1]}
    row.update(_best_so_far(storage, study, budget))
    report = _hpsearch(["report", "--study", study, "--storage", storage, "--no-artifact",
                        "--out", str(out / "results" / study)], out)
    best = out / "results" / study / "best.json"
    if report.returncode != 0 or not best.is_file():
        return {**row, "test_acc": None, "error": (report.stderr.strip().splitlines() or ["?"])[-1]}
    result = json.loads(best.read_text())
    return {**row, "best_trial": result["trial"], "test_acc": result["test_accuracy"],
            "best_params": result["params"]}


def run_starts(subset: int | None, epochs: int = 20, seed: int = 0) -> dict:
    """The starting configurations trained alone, on the split and with the seeds trials 0, 1, ...
    get in a study made with `--seed seed`."""
    from hpsearch.data import load_dataset
    from hpsearch.report import evaluate
    from hpsearch.space import load_space
    from hpsearch.study.session import trial_seed
    from hpsearch.train import TrainConfig, train_one

    space = load_space(None)
    data = load_dataset("fashion-mnist", subset=subset, seed=seed)
    rows = []
    for number, params in enumerate(space.starts):
        start = time.perf_counter()
        config = TrainConfig.from_params({**space.fixed, **params}, epochs=epochs,
                                         seed=trial_seed(seed, number))
        result = train_one(config, data)
        rows.append({"start": number + 1, "seconds": round(time.perf_counter() - start, 1),
                     "val_acc": result.final.val_acc, "model": result.model})
    best = max(rows, key=lambda r: r["val_acc"])
    test = evaluate(best["model"], data.test_x, data.test_y, data.classes, data.image_shape)
    return {"method": "starts", "seconds": round(sum(r["seconds"] for r in rows), 1),
            "per_start": [{k: v for k, v in r.items() if k != "model"} for r in rows],
            "best_start": best["start"], "best_val": best["val_acc"], "test_acc": test.accuracy}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def print_table(rows: list[dict], starts: dict) -> None:
    print(f"starts alone: best [[start]] {starts['best_start']}: val {starts['best_val']:.4f}, "
          f"test {starts['test_acc']:.4f} ({starts['seconds']:.0f} s for all of them)")
    print(f"{'budget':>6} {'method':<9} {'finished':>8} {'val@1/4':>8} {'val@1/2':>8} {'val':>8} "
          f"{'test':>7} {'vs starts':>9}")
    for r in rows:
        by = r.get("best_val_by", {})
        gain = r["test_acc"] - starts["test_acc"] if r.get("test_acc") is not None else None
        print(f"{r['budget_s']:>6} {r['method']:<9} {r.get('finished', '-'):>8} {_fmt(by.get(0.25)):>8} "
              f"{_fmt(by.get(0.5)):>8} {_fmt(r.get('best_val')):>8} {_fmt(r.get('test_acc')):>7} "
              f"{'-' if gain is None else f'{gain:+.4f}':>9}" + (f"  ({r['error']})" if r.get("error") else ""))


def summarize(runs: list[dict]) -> list[dict]:
    """Per (budget, method) over the seeds: mean test accuracy, mean and worst gain over the best
    start alone, and in how many seeds the method was at or above that start (a seed whose study
    or report failed has no test: `tested` counts those that did)."""
    groups: dict[tuple, list[tuple[float, float]]] = {}  # (budget, method) -> [(test, best start's test)]
    for run in runs:
        for r in run["rows"]:
            if r.get("test_acc") is not None:
                groups.setdefault((r["budget_s"], r["method"]), []).append((r["test_acc"], run["starts"]["test_acc"]))
    rows = []
    for (budget, method), pairs in groups.items():
        gains = [test - start for test, start in pairs]
        rows.append({"budget_s": budget, "method": method, "seeds": len(runs), "tested": len(pairs),
                     "test_mean": sum(test for test, _ in pairs) / len(pairs), "gain_mean": sum(gains) / len(gains),
                     "gain_worst": min(gains), "at_or_above": sum(g >= 0 for g in gains)})
    return rows


def print_summary(summary: list[dict], seeds: int) -> None:
    print(f"\nover {seeds} seeds: mean test, gain over the best start alone (mean, worst), seeds at or above it")
    print(f"{'budget':>6} {'method':<9} {'tested':>6} {'test':>7} {'gain':>8} {'worst':>8} {'>= start':>8}")
    for r in summary:
        print(f"{r['budget_s']:>6} {r['method']:<9} {r['tested']:>6} {r['test_mean']:7.4f} {r['gain_mean']:+8.4f} "
              f"{r['gain_worst']:+8.4f} {r['at_or_above']:>4}/{r['seeds']}"
              + (f"  ({r['seeds'] - r['tested']} without a test)" if r["tested"] < r["seeds"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="120,300,600", help="comma-separated seconds")
    parser.add_argument("--methods", default="default,random", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--seed", default="0", help="hpsearch run --seed for every study (and the starts); "
                                                    "comma-separated: the whole benchmark once per seed")
    parser.add_argument("--out", default="bench-search", help="working folder (studies, reports, search.json)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in args.seed.split(",")]
    except ValueError:
        parser.error(f"--seed takes integers, comma-separated; got {args.seed!r}")
    if len(set(seeds)) < len(seeds):  # one study name per seed: a repeat would add to the first
        parser.error(f"--seed lists a seed twice: {args.seed}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in seeds:
        starts = run_starts(args.subset, seed=seed)
        rows = [run_method(m, int(b), out, args.subset, seed) for b in args.budgets.split(",") for m in methods]
        runs.append({"seed": seed, "starts": starts, "rows": rows})
        if not args.json:
            if len(seeds) > 1:
                print(f"seed {seed}")
            print_table(rows, starts)
    result = {"runs": runs, "summary": summarize(runs)}
    (out / "search.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    elif len(runs) > 1:
        print_summary(result["summary"], len(runs))


if __name__ == "__main__":
    main()

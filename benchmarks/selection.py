"""Which validation signal picks the model that tests best: a study's top trials, tested.

    .venv/bin/python benchmarks/selection.py --study NAME [--storage URL] [--top 8]
        [--parallel 2] [--json]

The study's `--top` complete trials by validation accuracy are retrained with their own seeds
(the trial's model, bit for bit on a CPU) and tested once each, `--parallel` processes at a time
(one thread each). Printed per trial: validation accuracy and loss after the last epoch, training
accuracy (how far it overfits), test accuracy; then how well each signal ranks the trials by
test accuracy (Spearman) and the test accuracy of the trial each would pick.

Why: a search picks the best of many noisy validation numbers (6,000 images: one model's
accuracy has a standard error of ~0.37 points), so its pick's test accuracy is lower than its
validation accuracy promises; this measures by how much, on your study. The test split is read
here for the measurement only; a search never sees it.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor

SIGNALS = {"val_acc": lambda r: r["val_acc"], "-val_loss": lambda r: -r["val_loss"]}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _test_one(url: str, study: str, number: int) -> dict:
    import torch

    from hpsearch.report.retrain import retrain_data, train_and_test
    from hpsearch.specs import TrainConfig
    from hpsearch.study.view import open_view

    view = open_view(url, study)
    trial = next(t for t in view.trials if t.number == number)
    data = retrain_data(view, torch.device("cpu"), None, lambda line: None)
    result, _, test, seconds = train_and_test(TrainConfig.from_params(trial.config), data)
    final = result.final
    return {"trial": number, "start": trial.start, "params": trial.params,
            "study_val_acc": trial.value, "val_acc": final.val_acc, "val_loss": final.val_loss,
            "train_acc": final.train_acc, "test_acc": test.accuracy, "seconds": round(seconds, 1)}


def top_trials(url: str, study: str, top: int) -> list[int]:
    from hpsearch.study.view import open_view

    view = open_view(url, study)
    complete = [t for t in view.trials if t.state == "COMPLETE" and t.config is not None]
    return [t.number for t in sorted(complete, key=lambda t: -t.value)[:top]]


def summarize(rows: list[dict]) -> dict:
    """Spearman correlation (Pearson's of the ranks: no scipy needed) of each signal with test
    accuracy, and the test accuracy of the trial it ranks first."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    out = {}
    for name, signal in SIGNALS.items():
        scores = frame.apply(lambda r: signal(r), axis=1)
        pick = rows[int(scores.values.argmax())]
        out[name] = {"spearman_with_test": round(float(scores.rank().corr(frame["test_acc"].rank())), 3)
                     if len(rows) > 2 else None, "picks": pick["trial"], "pick_test_acc": pick["test_acc"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--storage", default="sqlite:///studies/hpsearch.db")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    numbers = top_trials(args.storage, args.study, args.top)
    if not numbers:
        sys.exit(f"error: study {args.study!r} has no complete trial with a recorded configuration")
    with ProcessPoolExecutor(max(1, args.parallel), initializer=_one_thread) as pool:
        rows = list(pool.map(_test_one, [args.storage] * len(numbers), [args.study] * len(numbers), numbers))
    summary = summarize(rows)
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=2, default=str))
        return
    print(f"{'trial':>5} {'start':>5} {'val_acc':>8} {'val_loss':>8} {'train':>7} {'test':>7}  params")
    for r in rows:
        print(f"{r['trial']:>5} {r['start'] or '':>5} {r['val_acc']:>8.4f} {r['val_loss']:>8.4f} "
              f"{r['train_acc']:>7.4f} {r['test_acc']:>7.4f}  {r['params']}")
    for name, s in summary.items():
        print(f"by {name}: Spearman with test {s['spearman_with_test']}, picks trial {s['picks']} "
              f"(test {s['pick_test_acc']:.4f})")


if __name__ == "__main__":
    main()

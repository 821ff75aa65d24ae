"""Training recipes compared on one configuration: accuracy per epoch, same run, same seed.

    .venv/bin/python benchmarks/recipe.py [--model mlp|mlp-920|cnn] [--epochs 20] [--parallel 2] [--subset N] [--json]

Trains one hand-picked model alone on the full Fashion-MNIST training split under each recipe,
`--parallel` processes at a time (one thread each when more than one), and prints validation and
test accuracy and time. mlp: 2 hidden layers of 512, ReLU, dropout 0.2, AdamW, weight decay
1e-2, batch 128 (the default space's modern-default [[start]]); mlp-920: its first [[start]]. cnn: the seeds' CNN as studies/cnn.toml's first [[start]] has it (32 -> 64
channels of 3x3 convolutions, max pooling, a 128-wide head, normal init).
The test split is evaluated once per recipe, for this measurement only (a search never sees it).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor

MODELS = {
    "mlp": (dict(num_layers=3, layer_size=512, activation="relu", dropout=0.2, optimizer="adamw", lr=1e-3,
                 weight_decay=1e-2, batch_size=128, seed=0), {
        "constant lr 1e-3 (hand-picked)": {},
        "cosine lr 1e-3": {"schedule": "cosine"},
        "cosine lr 1e-3 + smoothing 0.1": {"schedule": "cosine", "label_smoothing": 0.1},
        "cosine lr 2e-3 + smoothing 0.1": {"schedule": "cosine", "label_smoothing": 0.1, "lr": 2e-3},
        "cosine lr 1e-3 + smoothing + batch norm": {"schedule": "cosine", "label_smoothing": 0.1, "batch_norm": True},
        "cosine lr 2e-3 + smoothing + batch norm": {"schedule": "cosine", "label_smoothing": 0.1, "batch_norm": True,
                                                    "lr": 2e-3},
    }),
    # the default space's first [[start]]: 2 hidden layers of 920, lr 5e-4, dropout 0.05
    "mlp-920": (dict(num_layers=3, layer_size=920, activation="relu", dropout=0.05, optimizer="adamw", lr=5e-4,
                     weight_decay=1e-2, batch_size=128, seed=0, schedule="cosine", label_smoothing=0.1), {
        "cosine lr 5e-4 + smoothing 0.1": {},
        "cosine lr 5e-4 + smoothing + batch norm": {"batch_norm": True},
        "cosine lr 1e-3 + smoothing + batch norm": {"batch_norm": True, "lr": 1e-3},
    }),
    "cnn": (dict(family="cnn", conv_blocks=2, channels=32, kernel_size=3, pooling="max", conv_dropout=0.1,
                 num_layers=2, layer_size=128, dropout=0.3, activation="relu", optimizer="adamw", lr=2e-3,
                 weight_decay=1e-2, batch_size=128, init="normal", seed=0), {
        "constant lr 2e-3": {},
        "cosine + smoothing 0.1": {"schedule": "cosine", "label_smoothing": 0.1},
        "cosine + smoothing + rotate 10 / shift 1": {"schedule": "cosine", "label_smoothing": 0.1,
                                                     "augment_rotate": 10.0, "augment_shift": 1.0},
    }),
}


def _train(model: str, name: str, epochs: int, subset: int | None, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from hpsearch.data import load_dataset
    from hpsearch.report import evaluate
    from hpsearch.train import TrainConfig, train_one

    data = load_dataset("fashion-mnist", subset=subset, seed=0)
    base, recipes = MODELS[model]
    config = TrainConfig(**{**base, **recipes[name]}, epochs=epochs)
    start = time.perf_counter()
    result = train_one(config, data)
    seconds = time.perf_counter() - start
    test = evaluate(result.model, data.test_x, data.test_y, data.classes, data.image_shape)
    return {"recipe": name, "model": model, "epochs": epochs, "seconds": round(seconds, 1),
            "val_acc": [round(r.val_acc, 4) for r in result.history], "test_acc": test.accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = list(MODELS[args.model][1])
    n, threads = len(names), 1 if args.parallel > 1 else 2
    with ProcessPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(_train, [args.model] * n, names, [args.epochs] * n, [args.subset] * n, [threads] * n))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'recipe':<42} {'val best':>8} {'val last':>8} {'test':>7} {'seconds':>8}   val by epoch")
    for r in rows:
        curve = " ".join(f"{v:.3f}" for v in r["val_acc"][::max(1, len(r['val_acc']) // 5)])
        print(f"{r['recipe']:<42} {max(r['val_acc']):8.4f} {r['val_acc'][-1]:8.4f} {r['test_acc']:7.4f} "
              f"{r['seconds']:8.1f}   {curve}")


if __name__ == "__main__":
    main()

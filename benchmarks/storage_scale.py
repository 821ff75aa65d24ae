"""How far each storage carries many workers: the storage side of trials only, no training.

    .venv/bin/python benchmarks/storage_scale.py --storage sqlite:///tmp/scale.db [--workers 1,4,16,32]
        [--seconds 20] [--epochs 5] [--grpc-proxy postgresql://...] [--json]

Each worker is a process running hpsearch's real search loop and `StudySession` (ask under the
study lock, a report and a prune check per epoch, the trial's attributes, tell, heartbeats,
recovery of dead workers) with a trainer that returns every epoch at once. So the numbers are
what the storage and Optuna cost per trial, the ceiling of a study whose trials took no time.
Each row uses a new study; finished trials per second over the whole run, and errors (workers
that exited with a failure, and their first line).

--grpc-proxy URL puts Optuna's gRPC storage proxy (`run_grpc_proxy_server`, pip install grpcio
protobuf) in front of URL, in a process of its own, and points the workers at it (rows
"grpc-proxy"). hpsearch has no grpc:// storage URL, so the workers' `open_storage` is replaced
here; heartbeats then go through the proxy as trial attributes, as on a journal file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
import warnings
from types import SimpleNamespace


class InstantTrainer:
    """A PopulationTrainer stand-in: every member's epoch is done at once, with a plausible curve."""

    def __init__(self):
        self.members: dict = {}
        self.configs: dict = {}
        self.samples_trained = 0

    def add(self, key, config):
        self.members[key] = [config, 0]
        self.configs[key] = config

    def model(self, key):
        """An untrained network of the member's shape: the loop keeps the best trials' weights, and
        storing them is part of the storage's work."""
        from hpsearch.models import model_from_spec

        return model_from_spec(self.configs[key].model_spec(DATA))

    def remove(self, key):
        self.members.pop(key, None)

    def __contains__(self, key):
        return key in self.members

    def run_epoch(self):
        from hpsearch.train import EpochResult

        results = []
        for key, member in list(self.members.items()):
            member[1] += 1
            config, epoch = member
            acc = 0.8 + 0.1 * (1 - 0.5 ** epoch) * ((key * 7919) % 100) / 100  # trials differ: the pruner prunes
            finished = epoch >= config.epochs
            results.append(EpochResult(key, epoch, 0.5, acc, 0.4, acc, 0.0, 1, finished, None))
            if finished:
                self.remove(key)
        return results


DATA = SimpleNamespace(name="none", classes=tuple(map(str, range(10))), num_classes=10, in_features=784,
                       image_shape=(28, 28), mean=0.0, std=1.0, train_y=list(range(1000)),
                       describe=lambda: {"train": 1000})


GRPC_PORT = 13457


def _serve_proxy(url: str, port: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    optuna.storages.run_grpc_proxy_server(optuna.storages.RDBStorage(url), host="127.0.0.1", port=port)


def _use_proxy(port: int) -> None:
    """Workers open the proxy where the URL would name a storage (benchmark only)."""
    import optuna

    from hpsearch.study import continuing, session

    def open_proxy(url, liveness=None):
        return optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port)

    session.open_storage = continuing.open_storage = open_proxy


def _worker(url: str, study: str, seconds: float, epochs: int, out) -> None:
    from hpsearch.config import RunSettings
    from hpsearch.search import Reporter, SearchLoop
    from hpsearch.space import load_space
    from hpsearch.study import StudySession, liveness_settings
    from hpsearch.study.logs import configure_optuna_logging

    configure_optuna_logging(False)
    if url.startswith("grpc-proxy:"):
        _use_proxy(int(url.rsplit(":", 1)[1]))
    try:
        # Random sampling: TPE's own cost grows with the trials and is not the storage's.
        settings = RunSettings(trials=10**7, timeout=seconds, study=study, storage=url, epochs=epochs, start=False,
                               sampler="random")
        space = load_space("mlp")
        session = StudySession(settings, space, liveness_settings())
        began = time.time()
        summary = SearchLoop(settings, session, InstantTrainer(), Reporter(), population=1, data=DATA,
                             device="none").execute()
        out.put(("ok", summary.trials_run, began, time.time()))
    except BaseException as exc:  # noqa: BLE001 - counted and shown, not raised
        out.put(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}", 0.0, 0.0))


def measure(url: str, workers: int, seconds: float, epochs: int) -> dict:
    study = f"scale-{workers}w-{int(time.time() * 1000)}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, study, seconds, epochs, out)) for _ in range(workers)]
    start = time.monotonic()
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    wall = time.monotonic() - start
    ok = [r for r in results if r[0] == "ok"]
    trials = sum(r[1] for r in ok)
    # Over the span in which any worker was asking (their starts are staggered by process start-up).
    span = max(r[3] for r in ok) - min(r[2] for r in ok) if ok else float("nan")
    errors = [r[1] for r in results if r[0] == "error"]
    return {"storage": url.split(":", 1)[0].split("+")[0], "workers": workers, "wall_s": round(wall, 1), "asking_s": round(span, 1),
            "trials": trials, "trials_per_s": round(trials / span, 1) if ok else 0.0, "errors": len(errors),
            "first_error": errors[0] if errors else ""}


def _measure_proxy(url: str, workers: list[int], seconds: float, epochs: int) -> list[dict]:
    server = mp.get_context("spawn").Process(target=_serve_proxy, args=(url, GRPC_PORT), daemon=True)
    server.start()
    try:
        time.sleep(5)  # the server's start-up (imports, table check)
        return [measure(f"grpc-proxy:{GRPC_PORT}", n, seconds, epochs) for n in workers]
    finally:
        server.terminate()
        server.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", action="append", required=True, help="Storage URL (repeat for several).")
    parser.add_argument("--workers", default="1,4,16,32")
    parser.add_argument("--seconds", type=float, default=20.0, help="Asking time per row (each worker's --timeout).")
    parser.add_argument("--epochs", type=int, default=5, help="Reports and prune checks per trial.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--grpc-proxy", metavar="URL", help="Also measure Optuna's gRPC proxy in front of URL.")
    args = parser.parse_args()
    workers = [int(n) for n in args.workers.split(",")]
    rows = [measure(url, n, args.seconds, args.epochs) for url in args.storage for n in workers]
    if args.grpc_proxy:
        rows += _measure_proxy(args.grpc_proxy, workers, args.seconds, args.epochs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'storage':<12}{'workers':>8}{'trials/s':>10}{'trials':>8}{'errors':>8}  first error")
    for r in rows:
        print(f"{r['storage']:<12}{r['workers']:>8}{r['trials_per_s']:>10}{r['trials']:>8}{r['errors']:>8}  {r['first_error']}")


if __name__ == "__main__":
    main()

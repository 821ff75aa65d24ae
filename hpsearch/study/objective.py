"""`Objective`: hpsearch's search space and trainer as the objective of your own Optuna study.

For a study you make and drive yourself (your sampler, pruner, callbacks, `n_trials`): each call
samples a configuration from the space with `trial.suggest_*`, trains it alone (a population of
one, the same trainer and the same per-trial seed as `hpsearch run`), reports the validation
accuracy after every epoch, and returns it after the last epoch, as `hpsearch run` records a
trial's value. Pruned, diverged and collapsed trials raise `optuna.TrialPruned`. Every trial gets
the user attributes `hpsearch run` writes (`epochs_run`, `seconds_per_epoch`, `best_val_acc`,
`curves`, `config`, `stop_reason`, ...).
"""

from __future__ import annotations

import math
import threading

import optuna

from ..config import RunSettings, device_label, resolve_device
from ..errors import as_user_error
from ..space import Space, load_space
from ..specs import TrainConfig
from .schema import StudyAttr
from .session import AskedTrial, _config_for, _identity, _write_identity


class Objective:
    """Call it with an `optuna.Trial`: trains one configuration of the space, returns its
    validation accuracy. The dataset is loaded on the first call (or on `objective.data`), once.

    >>> import optuna, hpsearch
    >>> objective = hpsearch.Objective(subset=1000, epochs=2, space="mlp", device="cpu")
    >>> sorted(objective.space.names)[:3]
    ['activation', 'batch_size', 'dropout']
    >>> study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    >>> study.optimize(objective, n_trials=3)
    >>> [t.state.name for t in study.trials]
    ['COMPLETE', 'COMPLETE', 'COMPLETE']
    >>> best = study.best_trial
    >>> best.user_attrs["epochs_run"], best.user_attrs["stop_reason"], best.value > 0.3
    (2, 'completed', True)
    """

    def __init__(self, dataset: str = "fashion-mnist", *, data_dir: str | None = None,
                 space: str | Space | None = None, epochs: int = 20, subset: int | None = None,
                 val_fraction: float = 0.1, seed: int = 0, device: str = "auto", precision: str = "fp32"):
        # The same checks and one-line messages as `hpsearch run`'s flags.
        RunSettings(dataset=dataset, epochs=epochs, subset=subset, val_fraction=val_fraction, seed=seed,
                    device=device, precision=precision).validate()
        self.space: Space = space if isinstance(space, Space) else load_space(space)
        self.dataset, self.data_dir, self.epochs, self.subset = dataset, data_dir, epochs, subset
        self.val_fraction, self.seed, self.device, self.precision = val_fraction, seed, device, precision
        self._data = None
        self._marked = False
        self._loading = threading.Lock()  # study.optimize(n_jobs=N) calls from N threads

    def __repr__(self) -> str:
        return (f"Objective(dataset={self.dataset!r}, subset={self.subset!r}, epochs={self.epochs}, "
                f"space={self.space.source!r}, device={self.device!r})")

    @property
    def data(self):
        """The dataset (an `hpsearch.Dataset` on the device), loaded on first use."""
        with self._loading:
            if self._data is None:
                with as_user_error():
                    device = resolve_device(self.device)
                from ..data import load_dataset

                self._data = load_dataset(self.dataset, self.data_dir, device, self.val_fraction, self.subset,
                                          self.seed)
        return self._data

    def _mark_study(self, study: optuna.Study) -> None:
        """Write what the study measures, as `hpsearch run` does, so `hpsearch report` (and a later
        `hpsearch run --study`) can read it. Once; never over another hpsearch study's settings."""
        if self._marked or StudyAttr.DATASET in study.user_attrs or [d.name for d in study.directions] != ["MAXIMIZE"]:
            return
        settings = RunSettings(dataset=self.dataset, data_dir=self.data_dir, epochs=self.epochs, subset=self.subset,
                               val_fraction=self.val_fraction, seed=self.seed, study=study.study_name)
        _write_identity(study, settings, self.space, _identity(settings, self.space))
        self._marked = True

    def config(self, trial: optuna.Trial) -> TrainConfig:
        """Sample the space's parameters on `trial`: the configuration this trial trains."""
        return _config_for(trial, self.space, self.epochs, self.seed)

    def __call__(self, trial: optuna.Trial) -> float:
        from ..search import _Running, judge  # the run loop's rules: one definition of a trial's outcome
        from ..train import train_one

        self._mark_study(trial.study)
        data, config = self.data, self.config(trial)
        running = _Running(AskedTrial(trial.number, config, dict(trial.params)), config.model_spec(data).param_count())
        verdicts = []

        def on_epoch(result) -> bool:
            running.add(result)
            if result.diverged is None and math.isfinite(result.val_acc):
                trial.report(result.val_acc, result.epoch)
            verdicts.append(judge(result, running.curves["val_acc"], data.num_classes, trial.should_prune, False))
            return verdicts[-1] is None  # False: stop training

        trained = train_one(config, data, on_epoch, precision=self.precision)
        if trained.stopped not in (None, "callback"):  # diverged: train_one returned without calling on_epoch
            on_epoch(trained.final)
        verdict, last = verdicts[-1], trained.final
        record = running.record(last.epoch, device_label(data.train_x.device), verdict.reason)
        for key, value in record.to_attrs().items():
            trial.set_user_attr(key, value)
        if verdict.state == "PRUNED":
            reason = f"pruned at epoch {last.epoch}" if verdict.reason == "pruned" else verdict.reason
            raise optuna.TrialPruned(reason)
        return last.val_acc

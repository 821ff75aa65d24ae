"""The population trainer: members join and leave between epochs; each epoch trains every group.

Members are grouped (mlp.py pads shapes within a group, cnn.py stacks exact shapes) and each
group trains as one computation. The trainer knows nothing of Optuna: `PopulationTrainer`
takes `TrainConfig`s under caller-chosen keys and returns `EpochResult`s; `train_one` is the
plain single-run API.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch
from torch import nn

from ..config import GROUPINGS, PRECISIONS
from ..data import Dataset
from ..specs import TrainConfig
from .cnn import ConvGroup, cnn_member_model
from .graphcheck import EAGER, checked_capture, device_key
from .group import Group
from .mlp import Member, MLPGroup, member_model

# Bump when a change alters the numbers a given config and seed train to (init, shuffling,
# dropout streams, optimizer arithmetic): recorded per trial, so a report can tell why a retrained
# best model no longer reproduces a study's value.
TRAINER_VERSION = 3  # 3: batch norm through torch's kernel for full batches on a CPU (other float32 rounding)


@dataclass
class EpochResult:
    key: Hashable
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float  # wall time of the group epoch this member took part in
    group_size: int
    finished: bool = False  # reached config.epochs; the trainer has dropped the member
    diverged: str | None = None  # reason; the trainer has dropped the member
    train_path: str = EAGER  # what took the steps: graphcheck.CUDA_GRAPH, EAGER or EAGER_CHECK_FAILED


def _fraction(accuracy: float, total: int) -> float:
    """The float32 accuracy back as correct/total in Python's float (counts are exact below 2**24)."""
    return round(accuracy * total) / total if math.isfinite(accuracy) else accuracy


class PopulationTrainer:
    """Trains any number of configs at once; members join and leave between epochs.

    >>> trainer = PopulationTrainer(data)                      # doctest: +SKIP
    >>> trainer.add("a", TrainConfig(num_layers=3, epochs=2))  # doctest: +SKIP
    >>> while trainer: results = trainer.run_epoch()           # doctest: +SKIP
    """

    def __init__(self, data: Dataset, dtype: torch.dtype = torch.float32,
                 cuda_graphs: bool | None = None, divergence_loss: float = 1e4, precision: str = "fp32",
                 grouping: str = "batch", stack_convs: bool | None = None,
                 note: Callable[[str], None] | None = None):
        if grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
        self.grouping = grouping
        # CNN members share a grouped convolution only where that pays (see cnn.py): on a GPU.
        # No GPU is lent to this project's tests, so the first stacked group checks itself against
        # its members run alone (`_check_stacked`) and the trainer falls back if they disagree.
        self.stack_convs = (data.train_x.device.type == "cuda") if stack_convs is None else stack_convs
        self._stacking_checked = False
        self.note = note or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=2))
        self.data = data
        self.device = data.train_x.device
        self.dtype = dtype
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision != "fp32" and self.device.type != "cuda":
            raise ValueError(f"precision {precision} needs a CUDA device; use fp32 on a CPU")
        self.precision = precision
        if self.device.type == "cpu":
            # Denormal floats (tiny momentum/weight values late in training) run ~30x slower on
            # x86 CPUs: one 4x654 SGD trial went from 38 s to 1.4 s per epoch with this, same
            # accuracy. GPUs flush them in hardware. Process-wide, like the CUDA switches below.
            torch.set_flush_denormal(True)
        if self.device.type == "cuda":
            # process-wide switch; an explicit choice either way so an earlier trainer can't leak
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        self.use_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.divergence_loss = divergence_loss
        # Normalized once here; the models carry the same normalization as a buffer.
        self.train_x = (data.train_x.to(dtype) - data.mean) / data.std
        self.val_x = (data.val_x.to(dtype) - data.mean) / data.std
        self._members: dict[Hashable, Member] = {}
        self._groups: dict[tuple, Group] = {}
        self._dirty: set[tuple] = set()
        self._finished: dict[Hashable, Member] = {}  # members that left in the last run_epoch
        self.samples_trained = 0

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._members

    def _group_key(self, key: Hashable, config: TrainConfig) -> tuple:
        if config.family == "cnn":
            shape = (config.conv_blocks, config.channels, config.kernel_size, config.pooling,
                     config.num_layers, config.layer_size)
            return ("cnn", config.batch_size, shape, None if self.stack_convs else key)
        return ("mlp",) + self._mlp_group_key(config)

    def _mlp_group_key(self, config: TrainConfig) -> tuple:
        # A 1-layer model has no hidden layer to pad through, so it never shares a group; members
        # with batch norm share only with each other (a group normalizes all or none).
        common = (config.batch_size, config.batch_norm)
        if self.grouping == "shape":
            return common + (config.num_layers, config.layer_size)
        if self.grouping == "width":
            return common + (config.num_layers == 1, (config.layer_size - 1).bit_length())
        return common + (config.num_layers == 1,)

    def add(self, key: Hashable, config: TrainConfig) -> None:
        if key in self._members:
            raise KeyError(f"member {key!r} already present")
        self._members[key] = Member(key, config, config.model_spec(self.data))
        self._dirty.add(self._group_key(key, config))

    def remove(self, key: Hashable) -> None:
        member = self._members.pop(key)
        self._dirty.add(self._group_key(key, member.config))

    def _rebuild(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for gk in dirty:
            old = self._groups.pop(gk, None)
            if old is not None:
                for k, member in enumerate(old.members):
                    if member.key in self._members:
                        old.save_member(k)
            members = [m for m in self._members.values() if self._group_key(m.key, m.config) == gk]
            if members:
                family = ConvGroup if gk[0] == "cnn" else MLPGroup
                group = family(members, self.data, self.train_x, self.device, self.dtype, self.use_graphs,
                               self.precision)
                group.capture_graph = self._capture_graph
                self._groups[gk] = group
        for gk in dirty:
            group = self._groups.get(gk)
            if isinstance(group, ConvGroup) and group.K > 1 and not self._stacking_checked:
                self._check_stacked(gk)

    def _check_stacked(self, gk: tuple) -> None:
        """Compare a new stacked CNN group's logits with its members' own nn.Modules on a few
        validation images; on disagreement, train every CNN member alone from now on, and say so."""
        self._stacking_checked = True
        group = self._groups[gk]
        raw = self.data.val_x[:64]
        with torch.no_grad():
            stacked = group.forward(self.val_x[:64].expand(group.K, -1, -1), train=False).float()
            worst = 0.0
            for k, member in enumerate(group.members):
                alone = standalone_model(member).to(self.device)(raw.float()).float()
                worst = max(worst, float((stacked[k] - alone).abs().max() / alone.abs().max().clamp(min=1e-6)))
        if worst <= 1e-3:
            return
        self.note(f"stacked convolutions on {self.device} disagree with the members alone (relative "
                  f"error {worst:.2g}); training each CNN trial on its own instead")
        self.stack_convs = False
        for k, member in enumerate(group.members):
            group.save_member(k)
            self._dirty.add(self._group_key(member.key, member.config))
        del self._groups[gk]
        self._rebuild()

    def _capture_graph(self, group: Group) -> str:
        """The process's first graph of a kind is checked against the eager step (graphcheck.py):
        convolutions and matmuls are different kernels under capture, so each family has its own, and
        an MLP with batch norm (its statistics are more kernels) its own too."""
        family = "cnn" if isinstance(group, ConvGroup) else "mlp-bn" if group.any_batch_norm else "mlp"
        kind = (device_key(self.device), self.precision, family)
        return checked_capture(group, kind, self.note)

    def run_epoch(self) -> list[EpochResult]:
        """Advance every member one epoch; finished and diverged members leave the trainer."""
        self._rebuild()
        self._finished.clear()
        results = []
        for gk, group in list(self._groups.items()):
            start = time.perf_counter()
            train_loss, train_acc = group.train_epoch()
            val_loss, val_acc = group.evaluate(self.val_x, self.data.val_y)
            stats = torch.stack([train_loss, train_acc, val_loss, val_acc]).tolist()  # one sync
            seconds = time.perf_counter() - start
            self.samples_trained += group.K * len(self.data.train_y)
            for k, member in enumerate(group.members):
                tl, ta, vl, va = (s[k] for s in stats)
                # Accuracies as exact fractions (correct / total), not float32 quotients: the study
                # stores 0.851, not 0.8510000109672546.
                ta, va = _fraction(ta, len(self.data.train_y)), _fraction(va, len(self.data.val_y))
                diverged = None
                if not math.isfinite(tl) or not math.isfinite(vl):
                    diverged = f"non-finite loss at epoch {member.epoch}"
                elif tl > self.divergence_loss:
                    diverged = f"loss exploded to {tl:.3g} at epoch {member.epoch}"
                finished = diverged is None and member.epoch >= member.config.epochs
                results.append(EpochResult(member.key, member.epoch, tl, ta, vl, va, seconds,
                                           group.K, finished, diverged, group.train_path))
                if finished or diverged:
                    group.save_member(k)  # keep the final weights for model()
                    self._finished[member.key] = member
                    self.remove(member.key)
        return results

    def model(self, key: Hashable) -> nn.Module:
        """The network of a present member, or of one that left in the last `run_epoch`."""
        if key in self._finished:
            return standalone_model(self._finished[key])
        member = self._members[key]
        for group in self._groups.values():
            if member in group.members:
                return group.to_model(group.members.index(member))
        return standalone_model(member)


def standalone_model(member: Member) -> nn.Module:
    """A member's current weights as an eval-mode nn.Module of its family (float32, CPU)."""
    return cnn_member_model(member) if member.spec.family == "cnn" else member_model(member)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochResult] = field(default_factory=list)
    stopped: str | None = None  # why training ended early: "callback" or a divergence reason

    @property
    def final(self) -> EpochResult:
        return self.history[-1]


def train_one(config: TrainConfig, data: Dataset,
              on_epoch: Callable[[EpochResult], bool | None] | None = None,
              **trainer_kwargs) -> TrainResult:
    """Train one config alone (a population of one). `on_epoch` returning False stops early."""
    trainer = PopulationTrainer(data, **trainer_kwargs)
    trainer.add(0, config)
    history: list[EpochResult] = []
    while 0 in trainer:
        (result,) = trainer.run_epoch()
        history.append(result)
        if result.diverged:
            return TrainResult(trainer.model(0), history, result.diverged)
        if on_epoch is not None and on_epoch(result) is False and 0 in trainer:
            model = trainer.model(0)
            return TrainResult(model, history, "callback")
    return TrainResult(trainer.model(0), history)

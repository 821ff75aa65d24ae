"""Is a step replayed from a CUDA graph the same step? Checked where it runs, once per process.

No GPU is lent to this project's tests, so the CUDA-graph path checks itself on the user's
machine: the first group of each kind (device, precision, family) that would train through a
captured graph replays one step from the graph and takes the same step eagerly, both from one
cloned state (parameters, optimizer state, step counters, batch index), and compares what each
changed. If they disagree beyond `TOLERANCES`, or capture fails, that kind trains eagerly from then
on and the trainer's `note` says so in one line. The comparison takes the two paths as functions,
so its logic is tested on a CPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import first_line
from .memory import is_out_of_memory

# What trained a member (EpochResult.train_path, the trial attribute "train_path").
CUDA_GRAPH = "cuda-graph"
EAGER = "eager"
EAGER_CHECK_FAILED = "eager (graph check failed)"

# The largest difference allowed between the two paths' change to a tensor, relative to the
# largest change the eager step made to it. A replay runs the eager step's kernels on the same
# inputs, so a correct graph agrees bitwise, except where a kernel sums in a run-dependent order
# (atomics, or a cuBLAS/cuDNN algorithm chosen differently under capture). Such a reordering moves
# a result by a few rounding units of the arithmetic: fp32 6e-8 (a few 1e-6 after a sum over a
# batch), tf32 inputs 5e-4, bf16 4e-3 (autocast rounds activations to bf16, so one flipped rounding
# propagates); Adam's m / sqrt(v) passes a gradient's relative error on about 1:1. The tolerances
# leave 10-20x over that, while a capture bug (a stale input, a lost kernel, the wrong batch, a
# skipped update) changes the step by O(1).
TOLERANCES = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 5e-2}

Kind = tuple[str, str, str]  # (device, precision, family)


@dataclass(frozen=True)
class PathCheck:
    """The verdict of one comparison of two ways to take a step."""

    passed: bool
    worst: float  # max relative difference over the compared tensors; inf when the first path failed
    tolerance: float
    error: str | None = None  # why the first path (capture and replay) could not run

    def summary(self) -> str:
        if self.error is not None:
            return f"capture failed: {self.error}"
        return f"max rel diff {self.worst:.1e}, tolerance {self.tolerance:.0e}"

    def to_dict(self) -> dict:
        worst = self.worst if math.isfinite(self.worst) else None  # JSON has no inf
        return {"passed": self.passed, "max_rel_diff": worst, "tolerance": self.tolerance, "error": self.error,
                "summary": self.summary()}


def compare_step_paths(state: Sequence[torch.Tensor], capture: Callable[[], Callable[[], None]],
                       eager: Callable[[], None], tolerance: float,
                       restore_also: Sequence[torch.Tensor] = ()) -> PathCheck:
    """Run path A (`capture()` records a step and returns its replay, then the replay) and path B
    (`eager()`), each from the same snapshot of `state`, and compare what they did to `state`.

    Both paths update `state` in place. It is put back afterwards (in place: a recorded graph keeps
    its addresses), as is `restore_also` (tensors both paths touch that are not compared: a hit
    count, where rounding may flip an argmax). A RuntimeError from capture or replay fails the
    check (out-of-memory excepted: that is the trial's to report).
    """
    tensors = list(state) + list(restore_also)
    with torch.no_grad():
        before = [t.detach().clone() for t in tensors]
    try:
        try:
            capture()()
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise
            return PathCheck(False, math.inf, tolerance, first_line(exc, 160))
        with torch.no_grad():
            after_a = [t.detach().clone() for t in state]
        _restore(tensors, before)
        eager()
        worst = max((_relative_difference(b0, a, b) for b0, a, b in zip(before, after_a, state)), default=0.0)
    finally:
        _restore(tensors, before)
    return PathCheck(worst <= tolerance, worst, tolerance)


def _restore(tensors: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, s in zip(tensors, saved):
            t.copy_(s)


def _relative_difference(before: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """max |A - B| over max |B - before|: the paths' disagreement against the size of the eager
    step's change. NaN where both paths made NaN counts as agreement (a diverging member); NaN
    against a number as infinitely far."""
    with torch.no_grad():
        if not a.is_floating_point():  # the step counters
            before, a, b = (t.detach().double() for t in (before, a, b))
        same = (a == b) | (a.isnan() & b.isnan())
        if bool(same.all()):
            return 0.0
        diff = torch.where(same, 0.0, (a - b).abs()).nan_to_num(nan=math.inf).max()
        change = (b - before).abs().nan_to_num(nan=0.0, posinf=0.0).max().clamp(min=1e-30)
        ratio = float(diff / change)
    return ratio if math.isfinite(ratio) else math.inf


# ----------------------------------------------------------------------------------------------
# The verdict, once per process and kind

_VERDICTS: dict[Kind, PathCheck] = {}


def verdicts() -> dict[Kind, PathCheck]:
    """The checks this process has made, by (device, precision, family)."""
    return dict(_VERDICTS)


def device_key(device: torch.device) -> str:
    """"cuda:N" with the index a bare "cuda" means, so one GPU has one verdict."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def tolerance(kind: Kind) -> float:
    """TOLERANCES by precision; but PyTorch lets cuDNN convolutions use TF32 even at fp32
    (torch.backends.cudnn.allow_tf32, on by default), so a GPU's fp32 CNN gets tf32's."""
    device, precision, family = kind
    if device.startswith("cuda") and family == "cnn" and precision == "fp32" and torch.backends.cudnn.allow_tf32:
        return TOLERANCES["tf32"]
    return TOLERANCES[precision]


def failure_note(verdict: PathCheck, kind: Kind) -> str:
    device, precision, family = kind
    if verdict.error is not None:
        return f"CUDA graph capture failed on {device} ({precision}, {family}: {verdict.error}): training eagerly"
    return f"CUDA graph check failed on {device} ({precision}, {family}; {verdict.summary()}): training eagerly"


def checked_capture(group, kind: Kind, note: Callable[[str], None]) -> str:
    """Record `group`'s step as a CUDA graph, the process's first of `kind` checked against the
    eager step (`group.check_graph`); returns the path the group trains on. `group.graph` is set
    only for CUDA_GRAPH. A later capture that fails makes the verdict for its kind a failure too."""
    verdict = _VERDICTS.get(kind)
    if verdict is None:
        verdict = _VERDICTS[kind] = group.check_graph(tolerance(kind))
        if not verdict.passed:
            note(failure_note(verdict, kind))
    elif verdict.passed and group.graph is None:
        try:
            group.graph = group.record_graph()
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise
            verdict = _VERDICTS[kind] = PathCheck(False, math.inf, verdict.tolerance, first_line(exc, 160))
            note(failure_note(verdict, kind))
    if not verdict.passed:
        group.graph = None
        return EAGER_CHECK_FAILED
    return CUDA_GRAPH


def unchecked_capture(group) -> str:
    """A group without a trainer: record the graph, eager if capture fails (no note to give)."""
    try:
        group.graph = group.record_graph()
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise
        group.graph = None
        return EAGER
    return CUDA_GRAPH

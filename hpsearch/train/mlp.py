"""The MLP family in a population: members of any depth and width stacked into one computation.

Weights are stacked into one tensor per layer ([K, fan_in, fan_out], zero-padded to the widest
member) and trained with `baddbmm`, so a step costs the same number of kernel launches for 1
member or 64. Depth: a shallower member's missing hidden layers are pass-through
(`where(active, f(h), h)`). Width: padded units are multiplied by a 0/1 unit mask, so they output
exactly zero and get exactly zero gradient.

Batch norm (a group's members all have it or none do): per member and unit, over the step's real
rows, as nn.BatchNorm1d computes it in training (running statistics for evaluation). A padded
unit is zero on every row and its scale and shift are zero, so it stays exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable

import torch
import torch.nn.functional as F

from ..models import NeuralNetwork
from ..specs import ModelSpec, TrainConfig
from .group import Group
from .randomness import seed_mix


@dataclass
class Member:
    key: Hashable
    config: TrainConfig
    spec: ModelSpec
    epoch: int = 0
    steps: int = 0  # optimizer steps taken, for Adam's bias correction and dropout counters
    # CPU copies of the member's state while it is not stacked into a group tensor
    state: dict[str, list[torch.Tensor]] | None = None


def init_linear(gen: torch.Generator, fan_in: int, fan_out: int, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One Linear layer's (weight [fan_out, fan_in], bias) from `gen`.

    default: nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both. normal: the seeds' CNN
    script, weight N(0, 1/sqrt(fan_in)) and zero bias.
    """
    bound = 1.0 / math.sqrt(fan_in)
    if init == "normal":
        return torch.randn(fan_out, fan_in, generator=gen) * bound, torch.zeros(fan_out)
    w = (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound
    b = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound
    return w, b


def init_member(config: TrainConfig, spec: ModelSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The member's Linear layers from its own seed: [(weight [fan_in, fan_out], bias)], float32, CPU.

    (The transpose of nn.Linear's layout.) A CNN's head draws from the same generator after its
    convolutions, so `gen` may be passed in by cnn.py.
    """
    gen = torch.Generator().manual_seed(seed_mix(config.seed, 1))
    return init_linears(gen, config, spec)


def init_linears(gen: torch.Generator, config: TrainConfig, spec: ModelSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for fan_in, fan_out in zip(spec.widths[:-1], spec.widths[1:]):
        w, b = init_linear(gen, fan_in, fan_out, config.init)
        out.append((w.t().contiguous(), b))
    return out


# nn.BatchNorm1d's defaults
BN_MOMENTUM = 0.1
BN_EPS = 1e-5


def init_batch_norm(spec: ModelSpec) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A new member's batch-norm (scale and shift, running mean and variance), each [1, width]
    per hidden layer, as nn.BatchNorm1d starts (1, 0, 0, 1); empty without batch norm."""
    if not spec.batch_norm:
        return [], []
    sizes = spec.widths[1:-1]
    params = [torch.ones(1, s) for s in sizes] + [torch.zeros(1, s) for s in sizes]
    running = [torch.zeros(1, s) for s in sizes] + [torch.ones(1, s) for s in sizes]
    return params, running


class MLPGroup(Group):
    """MLP members with one batch size; padded to the deepest and widest member."""

    # Batch norm on a batch without padding rows through torch's kernel, member by member (see
    # `_batch_norm_whole`). None = auto: on a CPU, the only place it was measured. Off on a GPU
    # (eager or graph), where the loop would be K launches per layer and a recorded graph replays
    # the masked statistics anyway.
    native_batch_norm: bool | None = None

    def _init_parameters(self) -> None:
        """Stacked, zero-padded weights and optimizer state, filled with each member's own."""
        members = self.members
        self.L = max(m.spec.num_layers for m in members)
        self.H = max(m.spec.layer_size for m in members)
        self.widths = [self.data.in_features] + [self.H] * (self.L - 1) + [self.data.num_classes]
        fp = dict(device=self.device, dtype=self.dtype)
        widths = self.widths
        self.W = [torch.zeros(self.K, a, b, **fp) for a, b in zip(widths[:-1], widths[1:])]
        self.b = [torch.zeros(self.K, 1, b, **fp) for b in widths[1:]]
        self.any_batch_norm = members[0].spec.batch_norm  # the population groups by it
        chosen = self.native_batch_norm
        self.use_native_batch_norm = self.device.type == "cpu" if chosen is None else chosen
        assert all(m.spec.batch_norm == self.any_batch_norm for m in members)
        hidden = self.L - 1 if self.any_batch_norm else 0
        self.bn_scale = [torch.zeros(self.K, 1, self.H, **fp) for _ in range(hidden)]
        self.bn_shift = [torch.zeros(self.K, 1, self.H, **fp) for _ in range(hidden)]
        self.params = self.W + self.b + self.bn_scale + self.bn_shift
        self.running = [torch.zeros(self.K, 1, self.H, **fp) for _ in range(2 * hidden)]  # means, variances
        self.state_buffers = self.running
        self.m = [torch.zeros_like(p) for p in self.params]  # Adam m, or SGD momentum buffer
        self.v = [torch.zeros_like(p) for p in self.params]
        for k, member in enumerate(members):
            self._load_member(k, member)
        for p in self.params:
            p.requires_grad_(True)
        self._init_structure()

    def _init_structure(self) -> None:
        """Unit masks for padded widths, pass-through flags for missing layers."""
        members, H = self.members, self.H
        self.padded_width = any(m.spec.layer_size != H for m in members)
        self.unit_mask = torch.zeros(self.K, 1, H, device=self.device, dtype=self.dtype)
        for k, member in enumerate(members):
            self.unit_mask[k, :, : member.spec.layer_size] = 1
        # hidden layer l (1 <= l <= L-2) is real for a member with num_layers > l + 1
        self.layer_active = [self._per_member((m.spec.num_layers > l + 1 for m in members), torch.bool)
                             for l in range(self.L - 1)]
        self.any_passthrough = any(m.spec.num_layers != self.L for m in members)

    def eval_units_per_row(self) -> int:
        return self.K * self.H

    # -- moving member state in and out of the stacked tensors --------------------------------

    def _param_slots(self, member: Member) -> list[tuple[int, tuple[int, int]]]:
        """Where each of the member's parameters (weights, biases, then batch-norm scales and
        shifts: the order of its state["params"]) lives in self.params, and its shape. Hidden
        layers keep their index in the group, the output layer is the group's last."""
        widths, n, L = member.spec.widths, member.spec.num_layers, self.L
        layers = list(enumerate(list(range(n - 1)) + [L - 1]))
        slots = [(g, (widths[j], widths[j + 1])) for j, g in layers]
        slots += [(L + g, (1, widths[j + 1])) for j, g in layers]
        return slots + self._norm_slots(member, first=2 * L, second=3 * L - 1)  # after the L - 1 scales

    def _running_slots(self, member: Member) -> list[tuple[int, tuple[int, int]]]:
        """The same for the batch-norm running means, then variances, in self.running."""
        return self._norm_slots(member, first=0, second=self.L - 1)

    def _norm_slots(self, member: Member, first: int, second: int) -> list[tuple[int, tuple[int, int]]]:
        """A [1, width] slot per hidden layer j at `first + j`, then another at `second + j`
        (scales then shifts, or means then variances); none without batch norm."""
        if not self.any_batch_norm:
            return []
        shapes = [(1, width) for width in member.spec.widths[1:-1]]
        return [(first + j, s) for j, s in enumerate(shapes)] + [(second + j, s) for j, s in enumerate(shapes)]

    def _member_tensors(self, member: Member):
        """(state key, group tensors, slots) for everything a member keeps between groups."""
        params = self._param_slots(member)
        return (("params", self.params, params), ("m", self.m, params), ("v", self.v, params),
                ("running", self.running, self._running_slots(member)))

    def _load_member(self, k: int, member: Member) -> None:
        with torch.no_grad():
            if member.state is None:
                init = init_member(member.config, member.spec)
                norm_params, running = init_batch_norm(member.spec)
                member.state = {"params": [w for w, _ in init] + [b.view(1, -1) for _, b in init] + norm_params,
                                "running": running}
            for name, tensors, slots in self._member_tensors(member):
                for src, (g, (rows, cols)) in zip(member.state.get(name, ()), slots):
                    tensors[g][k, :rows, :cols] = src.to(self.device, self.dtype)

    def save_member(self, k: int) -> None:
        """Copy member k's slice out, so the group can be rebuilt without it losing anything."""
        member = self.members[k]
        with torch.no_grad():
            member.state = {name: [tensors[g][k, :rows, :cols].detach().clone() for g, (rows, cols) in slots]
                            for name, tensors, slots in self._member_tensors(member)}
        member.steps = int(self.step_count[k].item())

    def to_model(self, k: int) -> NeuralNetwork:
        self.save_member(k)
        return member_model(self.members[k])

    # -- the forward pass ----------------------------------------------------------------------

    def _forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        return self.dense(x, train)

    def _batch_norm(self, z: torch.Tensor, layer: int, train: bool) -> torch.Tensor:
        """nn.BatchNorm1d on hidden layer `layer`'s [K, rows, H] pre-activations, per member. In
        training: statistics over the step's real rows (`step_rows`: the last batch's padding
        rows left out), and the running ones updated as torch does (the variance unbiased); on a
        CPU a batch without padding rows goes through torch's kernel instead (same numbers). A
        last batch of one row, which nn.BatchNorm1d refuses, gives each unit its shift."""
        hidden = self.L - 1
        if train and self.whole_batch and self.use_native_batch_norm and z.shape[1] > 1:
            return self._batch_norm_whole(z, layer)
        if train:
            rows, n = self.step_rows, self.step_row_count  # [1, B, 1] of 0/1, and their sum
            mean = (z * rows).sum(1, keepdim=True) / n
            var = ((z - mean).square() * rows).sum(1, keepdim=True) / n
            with torch.no_grad():
                self.running[layer].lerp_(mean, BN_MOMENTUM)
                self.running[hidden + layer].lerp_(var * (n / (n - 1).clamp(min=1)), BN_MOMENTUM)
        else:
            mean, var = self.running[layer], self.running[hidden + layer]
        return (z - mean) * torch.rsqrt(var + BN_EPS) * self.bn_scale[layer] + self.bn_shift[layer]

    def _batch_norm_whole(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """Training on a batch without padding rows: torch's own batch-norm kernel, member by
        member on its [B, H] rows (so a member gets the same rounding alone and in a population:
        one kernel over all K*H columns summed in another order, and float32 members drifted
        apart by 0.1 in a logit after 3 epochs), running statistics updated in place. Forward and
        backward with the ReLU and next layer took 0.5-0.6x the masked sums' time on 2 CPU cores
        for one member of 128x920, 0.6-1.0x for four of 128x512 or 256x256; a whole epoch of one
        3x920 member 0.88-0.95x (two runs)."""
        hidden = self.L - 1
        return torch.stack([
            F.batch_norm(z[k], self.running[layer][k, 0], self.running[hidden + layer][k, 0],
                         self.bn_scale[layer][k, 0], self.bn_shift[layer][k, 0], training=True,
                         momentum=BN_MOMENTUM, eps=BN_EPS) for k in range(z.shape[0])])


def copy_linears(model_linears: list[torch.nn.Linear], params: list[torch.Tensor], n: int) -> None:
    """Member state (weights [fan_in, fan_out], biases [1, fan_out]) into nn.Linear layers."""
    with torch.no_grad():
        for j, linear in enumerate(model_linears):
            linear.weight.copy_(params[j].t().float())
            linear.bias.copy_(params[n + j].view(-1).float())


def copy_batch_norms(norms: list[torch.nn.BatchNorm1d], params: list[torch.Tensor], running: list[torch.Tensor],
                     steps: int) -> None:
    """Member batch-norm state (scales then shifts; running means then variances) into the modules."""
    h = len(norms)
    with torch.no_grad():
        for j, norm in enumerate(norms):
            norm.weight.copy_(params[j].view(-1).float())
            norm.bias.copy_(params[h + j].view(-1).float())
            norm.running_mean.copy_(running[j].view(-1).float())
            norm.running_var.copy_(running[h + j].view(-1).float())
            norm.num_batches_tracked.fill_(steps)


def member_model(member: Member) -> NeuralNetwork:
    """A standalone nn.Module with the member's current weights (float32, CPU)."""
    model = NeuralNetwork.from_spec(member.spec)
    n = member.spec.num_layers
    params = member.state["params"]
    copy_linears(model.linears(), params, n)
    copy_batch_norms(model.batch_norms(), params[2 * n:], member.state.get("running", []), member.steps)
    return model.eval()

"""The MLP family in a population: members of any depth and width stacked into one computation.

Weights are stacked into one tensor per layer ([K, fan_in, fan_out], zero-padded to the widest
member) and trained with `baddbmm`, so a step costs the same number of kernel launches for 1
member or 64. Depth: a shallower member's missing hidden layers are pass-through
(`where(active, f(h), h)`). Width: padded units are multiplied by a 0/1 unit mask, so they output
exactly zero and get exactly zero gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable

import torch

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


class MLPGroup(Group):
    """MLP members with one batch size; padded to the deepest and widest member."""

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
        self.params = self.W + self.b
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

    def _layer_map(self, member: Member) -> list[int]:
        """Member layer j -> group layer: hidden layers keep their index, the output layer is last."""
        n = member.spec.num_layers
        return list(range(n - 1)) + [self.L - 1]

    def _load_member(self, k: int, member: Member) -> None:
        with torch.no_grad():
            if member.state is None:
                init = init_member(member.config, member.spec)
                member.state = {"params": [w for w, _ in init] + [b.view(1, -1) for _, b in init]}
            state, n = member.state, member.spec.num_layers
            for name, tensors in (("params", self.params), ("m", self.m), ("v", self.v)):
                if name not in state:
                    continue
                src = state[name]
                for j, g in enumerate(self._layer_map(member)):
                    for src_t, dst in ((src[j], tensors[g]), (src[n + j], tensors[self.L + g])):
                        dst[k, : src_t.shape[0], : src_t.shape[1]] = src_t.to(self.device, self.dtype)

    def save_member(self, k: int) -> None:
        """Copy member k's slice out, so the group can be rebuilt without it losing anything."""
        member = self.members[k]
        widths = member.spec.widths
        state = {}
        with torch.no_grad():
            for name, tensors in (("params", self.params), ("m", self.m), ("v", self.v)):
                layers = list(enumerate(self._layer_map(member)))
                ws = [tensors[g][k, : widths[j], : widths[j + 1]].detach().clone() for j, g in layers]
                bs = [tensors[self.L + g][k, :, : widths[j + 1]].detach().clone() for j, g in layers]
                state[name] = ws + bs
        member.state = state
        member.steps = int(self.step_count[k].item())

    def to_model(self, k: int) -> NeuralNetwork:
        self.save_member(k)
        return member_model(self.members[k])

    # -- the forward pass ----------------------------------------------------------------------

    def _forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        return self.dense(x, train)


def copy_linears(model_linears: list[torch.nn.Linear], params: list[torch.Tensor], n: int) -> None:
    """Member state (weights [fan_in, fan_out], biases [1, fan_out]) into nn.Linear layers."""
    with torch.no_grad():
        for j, linear in enumerate(model_linears):
            linear.weight.copy_(params[j].t().float())
            linear.bias.copy_(params[n + j].view(-1).float())


def member_model(member: Member) -> NeuralNetwork:
    """A standalone nn.Module with the member's current weights (float32, CPU)."""
    model = NeuralNetwork.from_spec(member.spec)
    copy_linears(model.linears(), member.state["params"], member.spec.num_layers)
    return model.eval()

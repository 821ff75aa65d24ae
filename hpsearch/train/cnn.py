"""The CNN family in a population: members of one shape train as one grouped convolution.

Member k's images go to channel group k of `conv2d(..., groups=K)`, so K networks of one shape
take one convolution per layer; the head is the MLP family's batched `baddbmm`. Activations
keep the convolution's layout, [rows, K, channels, H, W], so per-member values broadcast from
dimension 1 there. Shapes are exact (no padding): a group is one batch size and one
architecture; learning rate, weight decay, optimizer, dropout, schedule, activation,
initialization and augmentation stay per member.

Measured on the 2-core CPU (32 -> 64 channels, batch 128): one grouped convolution over K=2
members took 33 s per epoch of both, over K=4 105 s, against 15 s for one member alone; so on a
CPU each CNN member trains in a group of its own (`PopulationTrainer(stack_convs=...)`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models import ConvNet
from ..specs import ModelSpec, TrainConfig
from .group import Group
from .mlp import Member, copy_linears, init_linears
from .randomness import seed_mix


def init_convs(gen: torch.Generator, spec: ModelSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """nn.Conv2d's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = c_in * k * k."""
    k = spec.kernel_size
    out = []
    for c_in, c_out in zip([1] + spec.conv_channels[:-1], spec.conv_channels):
        bound = 1.0 / math.sqrt(c_in * k * k)
        w = (torch.rand(c_out, c_in, k, k, generator=gen) * 2 - 1) * bound
        b = (torch.rand(c_out, generator=gen) * 2 - 1) * bound
        out.append((w, b))
    return out


def init_cnn_member(config: TrainConfig, spec: ModelSpec) -> list[torch.Tensor]:
    """The member's parameters from its own seed, in the group's order: conv weights, conv
    biases, head weights ([fan_in, fan_out]), head biases ([1, fan_out])."""
    gen = torch.Generator().manual_seed(seed_mix(config.seed, 1))
    convs = init_convs(gen, spec)
    linears = init_linears(gen, config, spec)
    return ([w for w, _ in convs] + [b for _, b in convs]
            + [w for w, _ in linears] + [b.view(1, -1) for _, b in linears])


class ConvGroup(Group):
    """CNN members of one shape and batch size."""

    # Memory format of the convolutions. None = auto: channels-last on a CPU, where `hpsearch bench
    # --models cnn` measured it 1.11x (trainer) and 1.16x (plain nn.Module) over NCHW in one run on
    # the 2-core machine; NCHW on a GPU until measured there.
    channels_last: bool | None = None

    def _init_parameters(self) -> None:
        self.spec = self.members[0].spec
        first = init_cnn_member(self.members[0].config, self.spec)  # shapes only
        fp = dict(device=self.device, dtype=self.dtype)
        self.params = [torch.zeros(self.K, *t.shape, **fp) for t in first]
        blocks, layers = self.spec.conv_blocks, self.spec.num_layers
        self.conv_w, self.conv_b = self.params[:blocks], self.params[blocks:2 * blocks]
        self.W, self.b = self.params[2 * blocks:2 * blocks + layers], self.params[2 * blocks + layers:]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        for k, member in enumerate(self.members):
            self._load_member(k, member)
        for p in self.params:
            p.requires_grad_(True)
        cfgs = [m.config for m in self.members]
        self.conv_dropout = self._per_member(c.conv_dropout for c in cfgs)
        self.any_conv_dropout = any(c.conv_dropout > 0 for c in cfgs)
        self.conv_seed32 = torch.tensor([seed_mix(c.seed, 5) for c in cfgs], device=self.device)

    def eval_units_per_row(self) -> int:
        h, w = self.spec.image_hw
        return self.K * self.spec.conv_channels[0] * h * w

    def _load_member(self, k: int, member: Member) -> None:
        if member.state is None:
            member.state = {"params": init_cnn_member(member.config, member.spec)}
        with torch.no_grad():
            for name, tensors in (("params", self.params), ("m", self.m), ("v", self.v)):
                for src, dst in zip(member.state.get(name, ()), tensors):
                    dst[k] = src.to(self.device, self.dtype)

    def save_member(self, k: int) -> None:
        member = self.members[k]
        with torch.no_grad():
            member.state = {name: [t[k].detach().clone() for t in tensors]
                            for name, tensors in (("params", self.params), ("m", self.m), ("v", self.v))}
        member.steps = int(self.step_count[k].item())

    def to_model(self, k: int) -> ConvNet:
        self.save_member(k)
        return cnn_member_model(self.members[k])

    def _forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        K, N, _ = x.shape
        spec, k = self.spec, self.spec.kernel_size
        H, W = spec.image_hw
        last = self.device.type == "cpu" if self.channels_last is None else self.channels_last
        fmt = torch.channels_last if last else torch.contiguous_format
        # [N, K, H, W]: member k's images are channel group k
        h, c_in = x.view(K, N, H, W).transpose(0, 1).reshape(N, K, H, W), 1
        for block, c_out in enumerate(spec.conv_channels):
            weight = self.conv_w[block].view(K * c_out, c_in, k, k).contiguous(memory_format=fmt)
            z = F.conv2d(h.contiguous(memory_format=fmt), weight, self.conv_b[block].view(-1),
                         padding=k // 2, groups=K)
            h = self._pool_and_activate(z, spec.pooling, K, c_out)
            if train and self.any_conv_dropout:
                a = h.view(N, K, c_out, *h.shape[-2:])
                h = self._dropout(a, block, self.conv_dropout, self.conv_seed32, member_dim=1).reshape(h.shape)
            c_in = c_out
        features = h.reshape(N, K, -1).transpose(0, 1)  # [K, N, C*H*W], in nn.Flatten's order
        return self.dense(features, train)

    def _pool_and_activate(self, z: torch.Tensor, pooling: str, K: int, c_out: int) -> torch.Tensor:
        """activation(z) then 2x2 pooling, as the model does it. For max pooling the activation goes
        after the pool: every activation here is non-decreasing, so the values are the same and it
        runs on a quarter of the elements."""
        N = z.shape[0]
        if pooling == "max":
            a = F.max_pool2d(z, 2)
            return self._activate(a.view(N, K, c_out, *a.shape[-2:]), member_dim=1).reshape(a.shape)
        a = self._activate(z.view(N, K, c_out, *z.shape[-2:]), member_dim=1).reshape(z.shape)
        return F.avg_pool2d(a, 2)


def cnn_member_model(member: Member) -> ConvNet:
    """A standalone ConvNet with the member's current weights (float32, CPU)."""
    model = ConvNet.from_spec(member.spec)
    params, blocks = member.state["params"], member.spec.conv_blocks
    with torch.no_grad():
        for j, conv in enumerate(model.convs()):
            conv.weight.copy_(params[j].float())
            conv.bias.copy_(params[blocks + j].float())
    copy_linears(model.linears(), params[2 * blocks:], member.spec.num_layers)
    return model.eval()

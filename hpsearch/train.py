"""The trainer: many small MLPs trained as one batched computation ("population training").

Why: a small MLP leaves a GPU idle; per-step launch overhead, not arithmetic, sets the pace.
So every training run here is a *population* of K >= 1 members:

- Members that share a batch size form a `_Group`. Their weights are stacked into one tensor per
  layer ([K, fan_in, fan_out], zero-padded to the widest member) and trained with `baddbmm`, so a
  step costs the same number of kernel launches for 1 member or 64.
- Depth: a shallower member's missing hidden layers are pass-through (`where(active, f(h), h)`).
  Width: padded units are multiplied by a 0/1 unit mask, so they output exactly zero and get
  exactly zero gradient. Activation, dropout, optimizer (AdamW or SGD+momentum), learning rate
  and weight decay are per-member tensors.
- Every random choice is the member's own: init from a generator seeded with the member's seed,
  a per-epoch permutation from (seed, epoch), and dropout masks from a counter-based hash of
  (seed, step, layer, row, unit). So a member follows the same trajectory alone or inside any
  population, up to floating-point rounding (tests/test_population.py proves it).
- The dataset is a device tensor; a batch is a gather by a slice of the member's permutation.
- The whole step (gather, forward, backward, optimizer) reads its step index from a device
  tensor and updates everything in place, so on CUDA it can be captured once as a CUDA graph and
  replayed; on CPU the same function runs eagerly.

The trainer knows nothing of Optuna: `PopulationTrainer` takes `TrainConfig`s under caller-chosen
keys and returns `EpochResult`s; `train_one` is the plain single-run API.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable

import torch
import torch.nn.functional as F

from .data import Dataset
from .config import GROUPINGS, PRECISIONS
from .models import LEAKY_SLOPE, NeuralNetwork
from .specs import OPTIMIZERS, ModelSpec, TrainConfig, warmup_steps

__all__ = ["EpochResult", "OPTIMIZERS", "PopulationTrainer", "TrainConfig", "TrainResult", "TRAINER_VERSION",
           "member_model", "permutations", "train_one"]

# Bump when a change alters the numbers a given config and seed train to (init, shuffling,
# dropout streams, optimizer arithmetic): recorded per trial, so a report can tell why a retrained
# best model no longer reproduces a study's value.
TRAINER_VERSION = 2
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
_M32 = 0xFFFFFFFF


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


# ----------------------------------------------------------------------------------------------
# Counter-based randomness: identical for a member whatever population it is in.


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash on values in [0, 2^32), in int64 without overflow (constant < 2^27)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def _seed_mix(*values: int) -> int:
    """Deterministic 32-bit seed from ints (Python side, for generators)."""
    h = 0x9E3779B9
    for v in values:
        h = int(_mix32(torch.tensor([(h ^ (v & _M32)) & _M32]))[0])
    return h


def _init_member(config: TrainConfig, spec: ModelSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from the member's own seed.

    Weights are [fan_in, fan_out] (the transpose of nn.Linear's layout), float32 on the CPU.
    """
    gen = torch.Generator().manual_seed(_seed_mix(config.seed, 1))
    out = []
    for fan_in, fan_out in zip(spec.widths[:-1], spec.widths[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        w = (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound
        b = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound
        out.append((w.t().contiguous(), b))
    return out


def permutations(seeds: list[int], epochs: list[int], n: int, device: torch.device) -> torch.Tensor:
    """[K, n] shuffles of range(n), member k's from (seeds[k], epochs[k]) only, made on the device.

    An argsort of hashed indices: one batched op for the whole population, no host-side
    randperm and no host-to-device copy per epoch.
    """
    keys = torch.tensor([_seed_mix(s, 2, e) for s, e in zip(seeds, epochs)], device=device).view(-1, 1)
    idx = torch.arange(n, device=device).view(1, -1)
    return torch.argsort(_mix32((_mix32(keys) + idx) & _M32), dim=1, stable=True)


# ----------------------------------------------------------------------------------------------


@dataclass
class _Member:
    key: Hashable
    config: TrainConfig
    spec: ModelSpec
    epoch: int = 0
    steps: int = 0  # optimizer steps taken, for Adam's bias correction and dropout counters
    # CPU copies of the member's state while it is not stacked into a group tensor
    state: dict[str, list[torch.Tensor]] | None = None


class _Group:
    """Members with one batch size, stacked. Rebuilt whenever membership changes."""

    def __init__(self, members: list[_Member], data: Dataset, train_x: torch.Tensor,
                 device: torch.device, dtype: torch.dtype, use_graphs: bool, precision: str = "fp32"):
        self.autocast_bf16 = precision == "bf16"
        self.members = members
        self.data, self.train_x = data, train_x
        self.device, self.dtype = device, dtype
        self.batch_size = members[0].config.batch_size
        self.K = len(members)
        self.L = max(m.spec.num_layers for m in members)
        self.H = max(m.spec.layer_size for m in members)
        self.widths = [data.in_features] + [self.H] * (self.L - 1) + [data.num_classes]
        self.steps_per_epoch = math.ceil(len(data.train_y) / self.batch_size)
        self._init_parameters()
        self._init_structure()
        self._init_hyperparameters()
        self._init_epoch_buffers()
        self.use_graphs = use_graphs
        self.graph: torch.cuda.CUDAGraph | None = None

    def _per_member(self, values: Iterable[float], dtype: torch.dtype | None = None) -> torch.Tensor:
        """A [K, 1, 1] tensor of one value per member, broadcasting against [K, rows, units]."""
        return torch.tensor(list(values), device=self.device, dtype=dtype or self.dtype).view(self.K, 1, 1)

    def _init_parameters(self) -> None:
        """Stacked, zero-padded weights and optimizer state, filled with each member's own."""
        fp = dict(device=self.device, dtype=self.dtype)
        widths = self.widths
        self.W = [torch.zeros(self.K, a, b, **fp) for a, b in zip(widths[:-1], widths[1:])]
        self.b = [torch.zeros(self.K, 1, b, **fp) for b in widths[1:]]
        self.params = self.W + self.b
        self.m = [torch.zeros_like(p) for p in self.params]  # Adam m, or SGD momentum buffer
        self.v = [torch.zeros_like(p) for p in self.params]
        for k, member in enumerate(self.members):
            self._load_member(k, member)
        for p in self.params:
            p.requires_grad_(True)

    def _init_structure(self) -> None:
        """Unit masks for padded widths, pass-through flags for missing layers, activations."""
        members, H = self.members, self.H
        self.padded_width = any(m.spec.layer_size != H for m in members)
        self.unit_mask = torch.zeros(self.K, 1, H, device=self.device, dtype=self.dtype)
        for k, member in enumerate(members):
            self.unit_mask[k, :, : member.spec.layer_size] = 1
        # hidden layer l (1 <= l <= L-2) is real for a member with num_layers > l + 1
        self.layer_active = [self._per_member((m.spec.num_layers > l + 1 for m in members), torch.bool)
                             for l in range(self.L - 1)]
        self.any_passthrough = any(m.spec.num_layers != self.L for m in members)
        acts = [m.config.activation for m in members]
        self.activation = acts[0] if len(set(acts)) == 1 else None
        # Mixed activations in one form: sigmoidal -> a * sigmoid(c * z) + d  (tanh = 2s(2z) - 1),
        # otherwise leaky relu with a per-member slope (relu: slope 0).
        self.act_sigmoidal = self._per_member((a in ("sigmoid", "tanh") for a in acts), torch.bool)
        self.act_scale = self._per_member(2.0 if a == "tanh" else 1.0 for a in acts)
        self.act_shift = self._per_member(-1.0 if a == "tanh" else 0.0 for a in acts)
        self.act_slope = self._per_member(LEAKY_SLOPE if a == "leaky_relu" else 0.0 for a in acts)

    def _init_hyperparameters(self) -> None:
        cfgs = [m.config for m in self.members]
        self.lr = self._per_member(c.lr for c in cfgs)
        self.wd = self._per_member(c.weight_decay for c in cfgs)
        self.decay = 1 - self.lr * self.wd  # AdamW's decoupled weight decay factor
        self.momentum = self._per_member(c.momentum for c in cfgs)
        self.is_adam = self._per_member((c.optimizer == "adamw" for c in cfgs), torch.bool)
        self.opts = {c.optimizer for c in cfgs}
        self.dropout = self._per_member(c.dropout for c in cfgs)
        self.any_dropout = any(c.dropout > 0 for c in cfgs)
        self.seed32 = torch.tensor([_seed_mix(c.seed, 3) for c in cfgs], device=self.device).view(self.K, 1, 1)
        self.step_count = self._per_member(float(m.steps) for m in self.members)
        # Learning-rate schedule (specs.lr_factor) and label smoothing, per member
        self.any_cosine = any(c.schedule == "cosine" for c in cfgs)
        self.cosine = self._per_member((c.schedule == "cosine" for c in cfgs), torch.bool)
        total = [c.epochs * self.steps_per_epoch for c in cfgs]
        self.total_steps = self._per_member(total)
        self.warmup_steps = self._per_member(warmup_steps(t) for t in total)
        self.any_smoothing = any(c.label_smoothing > 0 for c in cfgs)
        self.smoothing = self._per_member(c.label_smoothing for c in cfgs).view(self.K, 1)

    def _init_epoch_buffers(self) -> None:
        """Per-epoch inputs, updated in place (static addresses for CUDA graphs)."""
        fp = dict(device=self.device, dtype=self.dtype)
        n = len(self.data.train_y)
        S, B = self.steps_per_epoch, self.batch_size
        self.perm = torch.zeros(self.K, S, B, dtype=torch.long, device=self.device)
        last = n - (S - 1) * B
        row_w = torch.full((S, B), 1.0 / B, **fp)
        row_w[-1] = 0
        row_w[-1, :last] = 1.0 / last  # the last partial batch is averaged over its own size
        self.row_weight = row_w
        self.row_real = (row_w > 0).to(self.dtype)  # padding rows of the last batch count for nothing
        self.rows_per_step = self.row_real.sum(1)  # [S]
        self.row_ids = torch.arange(B, device=self.device).view(1, B, 1)
        self.unit_ids = torch.arange(self.H, device=self.device).view(1, 1, self.H)
        self.step_index = torch.zeros(1, dtype=torch.long, device=self.device)
        self.loss_sum = torch.zeros(self.K, **fp)
        self.correct_sum = torch.zeros(self.K, **fp)

    # -- moving member state in and out of the stacked tensors --------------------------------

    def _load_member(self, k: int, member: _Member) -> None:
        with torch.no_grad():
            if member.state is None:
                init = _init_member(member.config, member.spec)
                member.state = {"params": [w for w, _ in init] + [b.view(1, -1) for _, b in init]}
            state = member.state
            n = member.spec.num_layers
            # member layer j -> group layer: hidden layers keep their index, the output layer is last
            layer_map = list(range(n - 1)) + [self.L - 1]
            for name, tensors in (("params", self.params), ("m", self.m), ("v", self.v)):
                if name not in state:
                    continue
                src = state[name]
                for j, g in enumerate(layer_map):
                    for src_t, dst in ((src[j], tensors[g]), (src[n + j], tensors[self.L + g])):
                        dst[k, : src_t.shape[0], : src_t.shape[1]] = src_t.to(self.device, self.dtype)

    def save_member(self, k: int) -> None:
        """Copy member k's slice out, so the group can be rebuilt without it losing anything."""
        member = self.members[k]
        n = member.spec.num_layers
        widths = member.spec.widths
        layer_map = list(range(n - 1)) + [self.L - 1]
        state = {}
        with torch.no_grad():
            for name, tensors in (("params", self.params), ("m", self.m), ("v", self.v)):
                ws = [tensors[g][k, : widths[j], : widths[j + 1]].detach().clone() for j, g in enumerate(layer_map)]
                bs = [tensors[self.L + g][k, :, : widths[j + 1]].detach().clone() for j, g in enumerate(layer_map)]
                state[name] = ws + bs
        member.state = state
        member.steps = int(self.step_count[k].item())

    def to_model(self, k: int) -> NeuralNetwork:
        self.save_member(k)
        return member_model(self.members[k])

    # -- the step ------------------------------------------------------------------------------

    def _activate(self, z: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return torch.relu(z)
        if self.activation == "sigmoid":
            return torch.sigmoid(z)
        if self.activation == "tanh":
            return torch.tanh(z)
        if self.activation == "leaky_relu":
            return F.leaky_relu(z, LEAKY_SLOPE)
        sigmoidal = self.act_scale * torch.sigmoid(self.act_scale * z) + self.act_shift
        return torch.where(self.act_sigmoidal, sigmoidal, torch.where(z >= 0, z, z * self.act_slope))

    def _dropout(self, a: torch.Tensor, layer: int) -> torch.Tensor:
        # uniform in [0, 1) from hash(seed, step, layer, row, unit): the member's own stream
        step = self.step_count.to(torch.long)
        key = _mix32((self.seed32 ^ _mix32((step * 8 + layer) & _M32)) & _M32)
        rows = _mix32((key + self.row_ids) & _M32)  # [K, B, 1]
        u = _mix32((rows + self.unit_ids[..., : a.shape[-1]]) & _M32).to(a.dtype) * (1.0 / 2**32)
        keep = (u >= self.dropout).to(a.dtype) / (1.0 - self.dropout)
        return a * keep

    def forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        if self.autocast_bf16:  # no autocast weight cache: it does not mix with CUDA graphs
            with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False):
                return self._forward(x, train).float()
        return self._forward(x, train)

    def _forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        h = x
        for l in range(self.L):
            z = torch.baddbmm(self.b[l], h, self.W[l])
            if l == self.L - 1:
                return z
            a = self._activate(z)
            if train and self.any_dropout:
                a = self._dropout(a, l)
            if self.padded_width:
                a = a * self.unit_mask
            if l >= 1 and self.any_passthrough:
                a = torch.where(self.layer_active[l], a, h)
            h = a
        raise AssertionError("unreachable")

    def step(self) -> None:
        """One optimizer step for every member; reads and advances `step_index` on the device."""
        idx = self.perm.index_select(1, self.step_index).squeeze(1)  # [K, B]
        row_w = self.row_weight.index_select(0, self.step_index)  # [1, B]
        # index_select, not x[idx]: 5x faster on CPU (127 vs 670 us for a [4, 256] batch of 784)
        x = self.train_x.index_select(0, idx.view(-1)).view(self.K, -1, self.train_x.shape[1])  # [K, B, F]
        y = self.data.train_y.index_select(0, idx.view(-1)).view(self.K, -1)
        logits = self.forward(x, train=True)
        member_loss = (self._training_loss(logits, y) * row_w).sum(1)  # each member's mean over its real rows
        grads = torch.autograd.grad(member_loss.sum(), self.params)
        with torch.no_grad():
            self.loss_sum += member_loss.detach() * self.rows_per_step.index_select(0, self.step_index)
            hits = logits.detach().argmax(-1) == y
            self.correct_sum += (hits * self.row_real.index_select(0, self.step_index)).sum(1)
            self.step_count += 1
            self._update(grads)
            self.step_index += 1

    def _training_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[K, B] cross-entropy, label-smoothed per member as F.cross_entropy(label_smoothing=e) does."""
        if not self.any_smoothing:
            C = logits.shape[-1]
            return F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction="none").view(self.K, -1)
        logp = F.log_softmax(logits, -1)
        nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return (1 - self.smoothing) * nll - self.smoothing * logp.mean(-1)

    def _learning_rate(self) -> torch.Tensor:
        """[K, 1, 1] learning rates of this step: specs.lr_factor on the device, for every member."""
        if not self.any_cosine:
            return self.lr
        i = self.step_count - 1  # the 0-based index of the step being taken
        warm, total = self.warmup_steps, self.total_steps
        cosine = 0.5 * (1 + torch.cos(math.pi * (i - warm) / (total - warm).clamp(min=1)))
        factor = torch.where(i < warm, (i + 1) / warm, cosine)
        return self.lr * torch.where(self.cosine, factor, torch.ones_like(factor))

    def _update(self, grads: tuple[torch.Tensor, ...]) -> None:
        """AdamW and SGD+momentum as torch.optim computes them, batched over members, in place.

        In place on purpose: out-of-place temporaries plus copy-backs cost ~40% of a CPU step
        (profiled at 4x512, batch 128). SGD's momentum buffer starts at zero, so
        `momentum * buf + d_p` is torch's first-step `buf = d_p` without a branch.
        """
        lr, wd, t = self._learning_rate(), self.wd, self.step_count
        b1, b2 = ADAM_BETAS
        adam, sgd = "adamw" in self.opts, "sgd" in self.opts
        if adam:
            step_size = lr / (1 - b1**t)
            inv_bc2_sqrt = torch.rsqrt(1 - b2**t)
            decay = 1 - lr * wd if self.any_cosine else self.decay  # scheduled: decay follows the rate
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if adam and not sgd:
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.mul_(decay).sub_(m * step_size / (v.sqrt().mul_(inv_bc2_sqrt).add_(ADAM_EPS)))
            elif sgd and not adam:
                m.mul_(self.momentum).add_(g).add_(p * wd)
                p.sub_(m * lr)
            else:  # a mixed population: both updates, each member keeps its own
                m_a = torch.lerp(m, g, 1 - b1)
                v_a = v * b2 + (1 - b2) * g * g
                p_a = p * decay - m_a * step_size / (v_a.sqrt() * inv_bc2_sqrt + ADAM_EPS)
                buf = m * self.momentum + g + wd * p
                p.copy_(torch.where(self.is_adam, p_a, p - lr * buf))
                m.copy_(torch.where(self.is_adam, m_a, buf))
                v.copy_(torch.where(self.is_adam, v_a, v))

    # -- epochs --------------------------------------------------------------------------------

    def train_epoch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch for every member; returns per-member (mean loss, accuracy) on the device."""
        n = len(self.data.train_y)
        S, B = self.steps_per_epoch, self.batch_size
        perms = permutations([m.config.seed for m in self.members], [m.epoch for m in self.members], n, self.device)
        self.perm.view(self.K, S * B)[:, :n] = perms  # the tail of the last batch stays index 0, weight 0
        self.step_index.zero_()
        self.loss_sum.zero_()
        self.correct_sum.zero_()
        done = 0
        if self.use_graphs and self.graph is None:
            done = self._capture()
        for _ in range(done, S):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
        for m in self.members:
            m.epoch += 1
        return self.loss_sum / n, self.correct_sum / n

    def _capture(self) -> int:
        """Warm up on a side stream (real steps), then record one step as a CUDA graph."""
        warmup = min(3, self.steps_per_epoch)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step()
            self.graph = graph
        except RuntimeError:  # capture unsupported here: stay eager, correctness first
            self.use_graphs = False
            self.graph = None
        return warmup

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, chunk_rows: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member (mean loss, accuracy) over x, y, in chunks that bound memory."""
        loss = torch.zeros(self.K, device=self.device, dtype=self.dtype)
        correct = torch.zeros_like(loss)
        rows = max(1, chunk_rows // (self.K * self.H))
        for start in range(0, len(y), rows):
            xb = x[start:start + rows].to(self.dtype).expand(self.K, -1, -1)
            yb = y[start:start + rows]
            logits = self.forward(xb, train=False)
            C = logits.shape[-1]
            ce = F.cross_entropy(logits.reshape(-1, C), yb.repeat(self.K), reduction="none").view(self.K, -1)
            loss += ce.sum(1)
            correct += (logits.argmax(-1) == yb).to(loss.dtype).sum(1)
        return loss / len(y), correct / len(y)


def member_model(member: _Member) -> NeuralNetwork:
    """A standalone nn.Module with the member's current weights (float32, CPU)."""
    model = NeuralNetwork.from_spec(member.spec)
    params = member.state["params"]
    n = member.spec.num_layers
    with torch.no_grad():
        for j, linear in enumerate(model.linears()):
            linear.weight.copy_(params[j].t().float())
            linear.bias.copy_(params[n + j].view(-1).float())
    return model.eval()


# ----------------------------------------------------------------------------------------------


class PopulationTrainer:
    """Trains any number of configs at once; members join and leave between epochs.

    >>> trainer = PopulationTrainer(data)                      # doctest: +SKIP
    >>> trainer.add("a", TrainConfig(num_layers=3, epochs=2))  # doctest: +SKIP
    >>> while trainer: results = trainer.run_epoch()           # doctest: +SKIP
    """

    def __init__(self, data: Dataset, dtype: torch.dtype = torch.float32,
                 cuda_graphs: bool | None = None, divergence_loss: float = 1e4, precision: str = "fp32",
                 grouping: str = "batch"):
        if grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
        self.grouping = grouping
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
        self._members: dict[Hashable, _Member] = {}
        self._groups: dict[tuple, _Group] = {}
        self._dirty: set[tuple] = set()
        self._finished: dict[Hashable, _Member] = {}  # members that left in the last run_epoch
        self.samples_trained = 0

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._members

    def _group_key(self, config: TrainConfig) -> tuple:
        # A 1-layer model has no hidden layer to pad through, so it never shares a group.
        if self.grouping == "shape":
            return (config.batch_size, config.num_layers, config.layer_size)
        if self.grouping == "width":
            return (config.batch_size, config.num_layers == 1, (config.layer_size - 1).bit_length())
        return (config.batch_size, config.num_layers == 1)

    def add(self, key: Hashable, config: TrainConfig) -> None:
        if key in self._members:
            raise KeyError(f"member {key!r} already present")
        self._members[key] = _Member(key, config, config.model_spec(self.data))
        self._dirty.add(self._group_key(config))

    def remove(self, key: Hashable) -> None:
        member = self._members.pop(key)
        self._dirty.add(self._group_key(member.config))

    def _rebuild(self) -> None:
        for gk in self._dirty:
            old = self._groups.pop(gk, None)
            if old is not None:
                for k, member in enumerate(old.members):
                    if member.key in self._members:
                        old.save_member(k)
            members = [m for m in self._members.values() if self._group_key(m.config) == gk]
            if members:
                self._groups[gk] = _Group(members, self.data, self.train_x, self.device, self.dtype,
                                          self.use_graphs, self.precision)
        self._dirty.clear()

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
                diverged = None
                if not math.isfinite(tl) or not math.isfinite(vl):
                    diverged = f"non-finite loss at epoch {member.epoch}"
                elif tl > self.divergence_loss:
                    diverged = f"loss exploded to {tl:.3g} at epoch {member.epoch}"
                finished = diverged is None and member.epoch >= member.config.epochs
                results.append(EpochResult(member.key, member.epoch, tl, ta, vl, va, seconds,
                                           group.K, finished, diverged))
                if finished or diverged:
                    group.save_member(k)  # keep the final weights for model()
                    self._finished[member.key] = member
                    self.remove(member.key)
        return results

    def model(self, key: Hashable) -> NeuralNetwork:
        """The network of a present member, or of one that left in the last `run_epoch`."""
        if key in self._finished:
            return member_model(self._finished[key])
        member = self._members[key]
        for group in self._groups.values():
            if member in group.members:
                return group.to_model(group.members.index(member))
        return member_model(member)


@dataclass
class TrainResult:
    model: NeuralNetwork
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

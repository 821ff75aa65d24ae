"""What every group of stacked members shares, whatever the family: per-member hyperparameters,
the step (gather, augment, forward, loss, backward, optimizer), the epoch loop, CUDA-graph
capture and evaluation. A family (mlp.py, cnn.py) supplies the parameters and the forward pass.

Parameters are tensors with the member as their first dimension ([K, ...]); a per-member value
is a [K, 1, 1] tensor, reshaped by `_like` to broadcast against any parameter.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..data import Dataset
from ..models import LEAKY_SLOPE
from ..specs import warmup_steps
from .augment import augment
from .graphcheck import EAGER, PathCheck, compare_step_paths, unchecked_capture
from .randomness import permutations, seed_mix, uniform

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Group:
    """Members with one batch size (and, per family, compatible shapes), stacked.

    Rebuilt whenever membership changes; a member's state moves out with `save_member` and back
    in through the family's `_load_member`.
    """

    padded_width = False
    any_passthrough = False
    any_batch_norm = False  # a family that normalizes sets it and supplies `_batch_norm`
    state_buffers: list[torch.Tensor] = []  # state a step updates besides params, m and v (running statistics)
    # True while an eager step's batch has no padding rows (every batch but a partial last one):
    # batch norm may then use torch's own kernel over all rows. Always False for a recorded CUDA
    # graph, which replays one step for every batch (the masked statistics).
    whole_batch = False

    def __init__(self, members: list, data: Dataset, train_x: torch.Tensor,
                 device: torch.device, dtype: torch.dtype, use_graphs: bool, precision: str = "fp32"):
        self.autocast_bf16 = precision == "bf16"
        self.members = members
        self.data, self.train_x = data, train_x
        self.device, self.dtype = device, dtype
        self.batch_size = members[0].config.batch_size
        self.K = len(members)
        self.steps_per_epoch = math.ceil(len(data.train_y) / self.batch_size)
        self._init_parameters()
        self._init_activations()
        self._init_hyperparameters()
        self._init_epoch_buffers()
        self.use_graphs = use_graphs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.train_path = EAGER  # what trains the members: graphcheck.CUDA_GRAPH once a graph is recorded
        # How the graph is recorded; the trainer sets graphcheck.checked_capture (checked once per process).
        self.capture_graph: Callable[[Group], str] = unchecked_capture

    # -- supplied by a family -----------------------------------------------------------------

    def _init_parameters(self) -> None:
        """Set self.params (leaves, requires_grad) and self.m / self.v (optimizer state)."""
        raise NotImplementedError

    def _forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """[K, rows, features] normalized images -> [K, rows, classes] logits."""
        raise NotImplementedError

    def save_member(self, k: int) -> None:
        raise NotImplementedError

    def to_model(self, k: int) -> torch.nn.Module:
        raise NotImplementedError

    def eval_units_per_row(self) -> int:
        """The widest activation one evaluated row makes, over all members (bounds eval memory)."""
        raise NotImplementedError

    # -- per-member values ---------------------------------------------------------------------

    def _per_member(self, values: Iterable[float], dtype: torch.dtype | None = None) -> torch.Tensor:
        """A [K, 1, 1] tensor of one value per member, broadcasting against [K, rows, units]."""
        return torch.tensor(list(values), device=self.device, dtype=dtype or self.dtype).view(self.K, 1, 1)

    def _like(self, value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """A per-member value shaped to broadcast against a [K, ...] parameter."""
        return value.view(self.K, *([1] * (p.dim() - 1)))

    def _init_activations(self) -> None:
        acts = [m.config.activation for m in self.members]
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
        self.seed32 = torch.tensor([seed_mix(c.seed, 3) for c in cfgs], device=self.device).view(self.K, 1, 1)
        self.step_count = self._per_member(float(m.steps) for m in self.members)
        # Learning-rate schedule (specs.lr_factor) and label smoothing, per member
        self.any_cosine = any(c.schedule == "cosine" for c in cfgs)
        self.cosine = self._per_member((c.schedule == "cosine" for c in cfgs), torch.bool)
        total = [c.epochs * self.steps_per_epoch for c in cfgs]
        self.total_steps = self._per_member(total)
        self.warmup_steps = self._per_member(warmup_steps(t) for t in total)
        self.any_smoothing = any(c.label_smoothing > 0 for c in cfgs)
        self.smoothing = self._per_member(c.label_smoothing for c in cfgs).view(self.K, 1)
        # Augmentation: its own stream per member, (seed, 4)
        self.any_augment = any(c.augments for c in cfgs)
        self.augments = self._per_member((c.augments for c in cfgs), torch.bool)
        self.rotate = self._per_member(c.augment_rotate for c in cfgs)
        self.shift = self._per_member(c.augment_shift for c in cfgs)
        self.augment_seed32 = torch.tensor([seed_mix(c.seed, 4) for c in cfgs], device=self.device)

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
        self.step_index = torch.zeros(1, dtype=torch.long, device=self.device)
        self.loss_sum = torch.zeros(self.K, **fp)
        self.correct_sum = torch.zeros(self.K, **fp)

    # -- pieces of the forward pass both families use ------------------------------------------

    def _activate(self, z: torch.Tensor, member_dim: int = 0) -> torch.Tensor:
        if self.activation == "relu":
            return torch.relu(z)
        if self.activation == "sigmoid":
            return torch.sigmoid(z)
        if self.activation == "tanh":
            return torch.tanh(z)
        if self.activation == "leaky_relu":
            return F.leaky_relu(z, LEAKY_SLOPE)
        shape = [1] * z.dim()
        shape[member_dim] = self.K
        scale, shift = self.act_scale.view(shape), self.act_shift.view(shape)
        sigmoidal = scale * torch.sigmoid(scale * z) + shift
        return torch.where(self.act_sigmoidal.view(shape), sigmoidal, torch.where(z >= 0, z, z * self.act_slope.view(shape)))

    def _dropout(self, a: torch.Tensor, layer: int, rate: torch.Tensor, seed32: torch.Tensor,
                 member_dim: int = 0) -> torch.Tensor:
        """Inverted dropout of `a` ([K, rows, ...] or [rows, K, ...]) from the member's own stream."""
        rows = a.shape[1 - member_dim]
        u = uniform(seed32, self.step_count, layer, rows, a[0, 0].numel(), member_dim, a.dtype).view(a.shape)
        shape = [1] * a.dim()
        shape[member_dim] = self.K
        rate = rate.view(shape)
        return a * ((u >= rate).to(a.dtype) / (1.0 - rate))

    def _batch_norm(self, z: torch.Tensor, layer: int, train: bool) -> torch.Tensor:
        """Hidden layer `layer`'s pre-activations normalized (a family with `any_batch_norm`)."""
        raise NotImplementedError

    def dense(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """The Linear layers self.W / self.b on [K, rows, features] (an MLP, or a CNN's head).

        A family that pads sets `padded_width` (with `unit_mask`) or `any_passthrough` (with
        `layer_active`); the CNN's exact-shape groups need neither.
        """
        h = x
        L = len(self.W)
        for l in range(L):
            z = torch.baddbmm(self.b[l], h, self.W[l])
            if l == L - 1:
                return z
            if self.any_batch_norm:
                z = self._batch_norm(z, l, train)
            a = self._activate(z)
            if train and self.any_dropout:
                a = self._dropout(a, l, self.dropout, self.seed32)
            if self.padded_width:
                a = a * self.unit_mask
            if l >= 1 and self.any_passthrough:
                a = torch.where(self.layer_active[l], a, h)
            h = a
        raise AssertionError("unreachable")

    # -- the step ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        if self.autocast_bf16:  # no autocast weight cache: it does not mix with CUDA graphs
            with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False):
                return self._forward(x, train).float()
        return self._forward(x, train)

    def step(self) -> None:
        """One optimizer step for every member; reads and advances `step_index` on the device."""
        idx = self.perm.index_select(1, self.step_index).squeeze(1)  # [K, B]
        row_w = self.row_weight.index_select(0, self.step_index)  # [1, B]
        # index_select, not x[idx]: 5x faster on CPU (127 vs 670 us for a [4, 256] batch of 784)
        x = self.train_x.index_select(0, idx.view(-1)).view(self.K, -1, self.train_x.shape[1])  # [K, B, F]
        y = self.data.train_y.index_select(0, idx.view(-1)).view(self.K, -1)
        if self.any_augment:
            x = augment(x, self.data.image_shape, -self.data.mean / self.data.std, self)
        if self.any_batch_norm:  # batch statistics leave out the last batch's padding rows
            self.step_rows = self.row_real.index_select(0, self.step_index).unsqueeze(-1)
            self.step_row_count = self.rows_per_step.index_select(0, self.step_index)  # once, not per layer
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
        step_size = lr / (1 - b1**t)
        inv_bc2_sqrt = torch.rsqrt(1 - b2**t)
        decay = 1 - lr * wd if self.any_cosine else self.decay  # scheduled: decay follows the rate
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            like = lambda value: self._like(value, p)  # noqa: E731  ([K,1,1] -> [K,1,...,1])
            if adam and not sgd:
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.mul_(like(decay)).sub_(m * like(step_size) / (v.sqrt().mul_(like(inv_bc2_sqrt)).add_(ADAM_EPS)))
            elif sgd and not adam:
                m.mul_(like(self.momentum)).add_(g).add_(p * like(wd))
                p.sub_(m * like(lr))
            else:  # a mixed population: both updates, each member keeps its own
                m_a = torch.lerp(m, g, 1 - b1)
                v_a = v * b2 + (1 - b2) * g * g
                p_a = p * like(decay) - m_a * like(step_size) / (v_a.sqrt() * like(inv_bc2_sqrt) + ADAM_EPS)
                buf = m * like(self.momentum) + g + like(wd) * p
                is_adam = like(self.is_adam)
                p.copy_(torch.where(is_adam, p_a, p - like(lr) * buf))
                m.copy_(torch.where(is_adam, m_a, buf))
                v.copy_(torch.where(is_adam, v_a, v))

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
        partial_last = n % B != 0
        try:
            for i in range(done, S):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self.whole_batch = not (partial_last and i == S - 1)
                    self.step()
        finally:
            self.whole_batch = False
        for m in self.members:
            m.epoch += 1
        return self.loss_sum / n, self.correct_sum / n

    def _capture(self) -> int:
        """Warm up (real steps), then record one step as a CUDA graph through `capture_graph`,
        which leaves self.graph None when the graph fails its check or capture: eager from then on."""
        warmup = min(3, self.steps_per_epoch)
        self._warm_up(warmup)
        self.train_path = self.capture_graph(self)
        if self.graph is None:
            self.use_graphs = False
        return warmup

    def _warm_up(self, steps: int) -> None:
        """Real steps on a side stream, as capture needs (on a CPU, where only tests record fake
        graphs, plain steps)."""
        if self.device.type != "cuda":
            for _ in range(steps):
                self.step()
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(steps):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def record_graph(self) -> torch.cuda.CUDAGraph:
        """One step recorded, not run (its kernels run on each replay)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        return graph

    def check_graph(self, tolerance: float) -> PathCheck:
        """One step replayed from a newly recorded graph against one eager step, from one state,
        which is put back after; the graph stays in self.graph (the caller drops it on failure)."""
        index = self.step_index.clone()
        # warm-up may have used every batch of a short epoch: the checked step needs a real one
        self.step_index.remainder_(self.steps_per_epoch)

        def capture() -> Callable[[], None]:
            self.graph = self.record_graph()
            return self.graph.replay

        # Parameters show any difference in the optimizer state (they are updated from it), so m
        # and v are only put back: one copy of the parameters less to hold during the check.
        compared = [*self.params, *self.state_buffers, self.step_count, self.step_index, self.loss_sum]
        try:
            return compare_step_paths(compared, capture, self.step, tolerance,
                                      restore_also=[*self.m, *self.v, self.correct_sum])
        finally:
            self.step_index.copy_(index)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, chunk_units: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member (mean loss, accuracy) over x, y, in chunks that bound memory."""
        loss = torch.zeros(self.K, device=self.device, dtype=self.dtype)
        correct = torch.zeros_like(loss)
        rows = max(1, chunk_units // self.eval_units_per_row())
        for start in range(0, len(y), rows):
            xb = x[start:start + rows].to(self.dtype).expand(self.K, -1, -1)
            yb = y[start:start + rows]
            logits = self.forward(xb, train=False)
            C = logits.shape[-1]
            ce = F.cross_entropy(logits.reshape(-1, C), yb.repeat(self.K), reduction="none").view(self.K, -1)
            loss += ce.sum(1)
            correct += (logits.argmax(-1) == yb).to(loss.dtype).sum(1)
        return loss / len(y), correct / len(y)

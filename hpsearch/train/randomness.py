"""Counter-based randomness: every random number a member uses is a hash of its own seed and a
counter (epoch, step, layer, row, unit), so it is the same whatever population the member is in.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash on values in [0, 2^32), in int64 without overflow (constant < 2^27)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def seed_mix(*values: int) -> int:
    """Deterministic 32-bit seed from ints (Python side, for generators)."""
    h = 0x9E3779B9
    for v in values:
        h = int(mix32(torch.tensor([(h ^ (v & M32)) & M32]))[0])
    return h


def permutations(seeds: list[int], epochs: list[int], n: int, device: torch.device) -> torch.Tensor:
    """[K, n] shuffles of range(n), member k's from (seeds[k], epochs[k]) only, made on the device.

    An argsort of hashed indices: one batched op for the whole population, no host-side
    randperm and no host-to-device copy per epoch.
    """
    keys = torch.tensor([seed_mix(s, 2, e) for s, e in zip(seeds, epochs)], device=device).view(-1, 1)
    idx = torch.arange(n, device=device).view(1, -1)
    return torch.argsort(mix32((mix32(keys) + idx) & M32), dim=1, stable=True)


def uniform(seed32: torch.Tensor, step: torch.Tensor, stream: int, rows: int, units: int,
            member_dim: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniforms in [0, 1) from hash(seed, step, stream, row, unit), one per member, row and unit.

    seed32 and step hold one value per member (any shape with K elements). The result is
    [K, rows, units] (member_dim 0) or [rows, K, units] (member_dim 1, a convolution's layout);
    either way member k, row r, unit u gets the same number.
    """
    K = seed32.numel()
    shape = (K, 1, 1) if member_dim == 0 else (1, K, 1)
    key = mix32((seed32.view(shape) ^ mix32((step.view(shape).to(torch.long) * 8 + stream) & M32)) & M32)
    row_ids = torch.arange(rows, device=seed32.device).view((1, rows, 1) if member_dim == 0 else (rows, 1, 1))
    unit_ids = torch.arange(units, device=seed32.device).view(1, 1, units)
    return mix32((mix32((key + row_ids) & M32) + unit_ids) & M32).to(dtype) * (1.0 / 2**32)
